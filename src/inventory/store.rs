//! The inventory directory on disk (blocking I/O: called on the blocking
//! pool, never on the runtime's threads).
//!
//! Each host's files are written to temporary files in the directory
//! itself (`.livemux-tmp-*`, removed if anything fails, and at start-up
//! if a crash left any), checked (the `.gz` must be valid gzip), given the
//! site's timestamp as their mtime and renamed into place: a reader sees
//! the old file or the new one, never a part. The layout is decided from
//! the tree file's content: JSON means the current layout (`<host>.json`,
//! `<host>.json.gz`), anything else (a Python literal) the legacy one
//! (`<host>`, `<host>.gz`), as the site stores them.
//!
//! A manifest per site (`.livemux/<site>.json` in the directory) records
//! every file livemux wrote and the timestamp it wrote it with; only files
//! named there are ever replaced by another layout's or deleted. The
//! [`Registry`] shares, across sites, which site owns a host name: the
//! first site to write it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tempfile::NamedTempFile;

use super::plan::Written;

/// Prefix of temporary files in the inventory directory.
pub const TEMP_PREFIX: &str = ".livemux-tmp-";
/// The directory (inside the inventory directory) holding the manifests.
pub const MANIFEST_DIR: &str = ".livemux";
/// Mode of the files written: as a Checkmk site's (umask 0007).
const FILE_MODE: u32 = 0o660;

/// A file operation failed: the sync stops and is retried next interval.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct StoreError {
    /// What was being done.
    pub action: &'static str,
    /// The file or directory.
    pub path: PathBuf,
    /// Why it failed.
    pub source: io::Error,
}

fn fail<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> StoreError + use<'p> {
    move |source| StoreError { action, path: path.to_owned(), source }
}

/// Which site wrote each host name first, shared by all sites' syncs.
#[derive(Debug, Default)]
pub struct Registry {
    owners: Mutex<HashMap<String, String>>,
}

impl Registry {
    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The site other than `site` that owns `host`, if any.
    pub fn other_owner(&self, host: &str, site: &str) -> Option<String> {
        self.owners().get(host).filter(|o| *o != site).cloned()
    }

    /// Claim `host` for `site`; the owner if another site has it.
    fn claim(&self, host: &str, site: &str) -> Result<(), String> {
        let mut owners = self.owners();
        match owners.get(host) {
            Some(o) if o != site => Err(o.clone()),
            Some(_) => Ok(()),
            None => {
                owners.insert(host.to_owned(), site.to_owned());
                Ok(())
            }
        }
    }

    fn release(&self, host: &str, site: &str) {
        let mut owners = self.owners();
        if owners.get(host).is_some_and(|o| o == site) {
            owners.remove(host);
        }
    }
}

/// Remove temporary files a previous run left behind (they are only ever
/// this program's).
pub fn remove_stale_temps(dir: &Path) -> Result<usize, StoreError> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(fail("read", dir)(e)),
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(fail("remove", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The manifest file's content.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Manifest {
    version: u32,
    hosts: BTreeMap<String, Written>,
}

/// What a host's commit did.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// Files written (bytes in total).
    Written(u64),
    /// Left as it was, and why.
    Skipped(String),
    /// Another site (named) wrote a host of that name first.
    Conflict(String),
}

/// A site's store as opened, with what is worth a log line.
#[derive(Debug)]
pub struct Opened {
    /// The store.
    pub store: SiteStore,
    /// Hosts in the manifest that another site holds: (host, owner).
    pub conflicts: Vec<(String, String)>,
    /// The manifest was unreadable and set aside.
    pub warning: Option<String>,
}

/// One site's part of the inventory directory.
#[derive(Debug)]
pub struct SiteStore {
    dir: PathBuf,
    site: String,
    manifest_path: PathBuf,
    written: BTreeMap<String, Written>,
    registry: Arc<Registry>,
    max_file_bytes: u64,
}

impl SiteStore {
    /// Open (creating the directories) and load the site's manifest; its
    /// hosts are claimed for the site, except those another site claimed
    /// first (returned, to be logged). An unreadable manifest is set aside
    /// (`.bad`) with a warning: the sync starts afresh and rewrites every
    /// host, and files it no longer knows of stay.
    pub fn open(dir: &Path, site: &str, registry: Arc<Registry>, max_file_bytes: u64) -> Result<Opened, StoreError> {
        let manifests = dir.join(MANIFEST_DIR);
        std::fs::create_dir_all(&manifests).map_err(fail("create", &manifests))?;
        let manifest_path = manifests.join(format!("{site}.json"));
        let mut warning = None;
        let manifest: Manifest = match std::fs::read(&manifest_path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    let aside = manifest_path.with_extension("json.bad");
                    std::fs::rename(&manifest_path, &aside).map_err(fail("set aside", &manifest_path))?;
                    warning = Some(format!(
                        "inventory manifest {} is unreadable ({e}); moved to {} and starting afresh",
                        manifest_path.display(),
                        aside.display()
                    ));
                    Manifest::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(fail("read", &manifest_path)(e)),
        };
        let mut written = manifest.hosts;
        let mut conflicts = Vec::new();
        written.retain(|host, _| match registry.claim(host, site) {
            Ok(()) => true,
            Err(other) => {
                conflicts.push((host.clone(), other));
                false
            }
        });
        let store =
            SiteStore { dir: dir.to_owned(), site: site.to_owned(), manifest_path, written, registry, max_file_bytes };
        Ok(Opened { store, conflicts, warning })
    }

    /// What livemux wrote for this site.
    pub fn written(&self) -> &BTreeMap<String, Written> {
        &self.written
    }

    /// The shared owner registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The site's name.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// Write the manifest (atomically).
    pub fn save(&self) -> Result<(), StoreError> {
        let dir = self.manifest_path.parent().unwrap_or(&self.dir);
        #[derive(serde::Serialize)]
        struct ManifestRef<'a> {
            version: u32,
            hosts: &'a BTreeMap<String, Written>,
        }
        let manifest = ManifestRef { version: 1, hosts: &self.written };
        let mut tmp = tempfile::Builder::new().prefix(TEMP_PREFIX).tempfile_in(dir).map_err(fail("create in", dir))?;
        let mut out = BufWriter::new(tmp.as_file_mut());
        serde_json::to_writer(&mut out, &manifest)
            .map_err(io::Error::from)
            .and_then(|()| out.flush())
            .map_err(fail("write", &self.manifest_path))?;
        drop(out);
        tmp.persist(&self.manifest_path).map_err(|e| fail("replace", &self.manifest_path)(e.error))?;
        Ok(())
    }

    /// Remove a host's files (those livemux wrote) and forget it.
    pub fn remove(&mut self, host: &str) -> Result<(), StoreError> {
        if let Some(w) = self.written.get(host) {
            for f in &w.files {
                remove_if_there(&self.dir.join(f))?;
            }
            self.written.remove(host);
            self.registry.release(host, &self.site);
        }
        Ok(())
    }

    /// Start writing a host's files.
    pub fn begin(&self) -> Result<HostFiles, StoreError> {
        Ok(HostFiles { plain: self.temp()?, gz: self.temp()?, plain_len: 0, gz_len: 0, too_large: false })
    }

    fn temp(&self) -> Result<BufWriter<NamedTempFile>, StoreError> {
        let f = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(fail("create in", &self.dir))?;
        Ok(BufWriter::with_capacity(64 * 1024, f))
    }

    /// Check a host's files and move them into place with mtime `mtime`.
    /// A file that fails its check leaves the host as it was.
    pub fn commit(
        &mut self,
        host: &str,
        mtime: i64,
        files: HostFiles,
        unconfirmed: bool,
    ) -> Result<Committed, StoreError> {
        let HostFiles { plain, gz, plain_len, gz_len, too_large } = files;
        if too_large {
            return Ok(Committed::Skipped(format!("a file is larger than max_file_bytes ({})", self.max_file_bytes)));
        }
        if plain_len == 0 {
            return Ok(Committed::Skipped("the site sent an empty tree file".into()));
        }
        if let Err(other) = self.registry.claim(host, &self.site) {
            return Ok(Committed::Conflict(other));
        }
        let plain = finish(plain, &self.dir)?;
        let gz = if gz_len > 0 { Some(finish(gz, &self.dir)?) } else { None };
        if let Some(gz) = &gz
            && let Err(e) = check_gzip(gz.path())
        {
            return Ok(Committed::Skipped(format!("its .gz file is not valid gzip ({e})")));
        }
        let json = is_json(plain.path()).map_err(fail("read", plain.path()))?;
        let (plain_name, gz_name) = if json {
            (format!("{host}.json"), format!("{host}.json.gz"))
        } else {
            (host.to_owned(), format!("{host}.gz"))
        };
        let when = UNIX_EPOCH + Duration::from_secs(u64::try_from(mtime).unwrap_or(0));
        let mut files = Vec::with_capacity(2);
        for (tmp, name) in [(gz, gz_name), (Some(plain), plain_name)] {
            let Some(tmp) = tmp else { continue };
            let target = self.dir.join(&name);
            set_mode_and_mtime(tmp.as_file(), when).map_err(fail("set the mtime of", tmp.path()))?;
            tmp.persist(&target).map_err(|e| fail("rename a file to", &target)(e.error))?;
            files.push(name);
        }
        // Files of the host's other layout (or a .gz the site no longer
        // has) that livemux wrote before.
        if let Some(old) = self.written.get(host) {
            for f in old.files.iter().filter(|f| !files.contains(f)) {
                remove_if_there(&self.dir.join(f))?;
            }
        }
        self.written.insert(host.to_owned(), Written { mtime, files, unconfirmed });
        Ok(Committed::Written(plain_len + gz_len))
    }
}

/// A host's files while they are being written.
#[derive(Debug)]
pub struct HostFiles {
    plain: BufWriter<NamedTempFile>,
    gz: BufWriter<NamedTempFile>,
    plain_len: u64,
    gz_len: u64,
    too_large: bool,
}

impl HostFiles {
    /// Append to the tree file (`gz: false`) or the `.gz` file; beyond
    /// `limit` bytes a file is no longer written and the host is skipped.
    pub fn write(&mut self, gz: bool, bytes: &[u8], limit: u64, dir: &Path) -> Result<(), StoreError> {
        let (out, len) = if gz { (&mut self.gz, &mut self.gz_len) } else { (&mut self.plain, &mut self.plain_len) };
        *len += bytes.len() as u64;
        if *len > limit {
            self.too_large = true;
        }
        if self.too_large {
            return Ok(());
        }
        out.write_all(bytes).map_err(fail("write a file in", dir))
    }
}

fn finish(w: BufWriter<NamedTempFile>, dir: &Path) -> Result<NamedTempFile, StoreError> {
    w.into_inner().map_err(|e| fail("write a file in", dir)(e.into_error()))
}

fn set_mode_and_mtime(f: &File, when: std::time::SystemTime) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    f.set_modified(when)
}

fn remove_if_there(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(fail("remove", path)(e)),
        _ => Ok(()),
    }
}

/// Decompress a whole gzip file (all members), keeping nothing.
fn check_gzip(path: &Path) -> io::Result<()> {
    let mut d = flate2::bufread::MultiGzDecoder::new(BufReader::new(File::open(path)?));
    io::copy(&mut d, &mut io::sink()).map(drop)
}

/// True if the file is one JSON document (the current layout's tree).
fn is_json(path: &Path) -> io::Result<bool> {
    let r = BufReader::new(File::open(path)?);
    Ok(serde_json::from_reader::<_, serde::de::IgnoredAny>(r).is_ok())
}
