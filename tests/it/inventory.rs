//! HW/SW inventory sync against simulated sites: files byte-identical to
//! the site's with its timestamps, updates (also in the same second as the
//! last sync), removals that spare foreign files, hostile names, corrupt
//! blobs, a site failing mid-answer, two sites with one host name.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use livemux::config::{InventoryConfig, SiteParams};
use livemux::inventory::InventorySnapshot;
use livemux::site::SiteState;
use livemux_simsite::SimSite;
use livemux_simsite::inventory::{Layout, Tree, generate};

use crate::support::{PATIENCE, Proxy, fast_params, sim, test_config};

/// A proxy syncing `sites` into `<tmp>/inventory` every `interval`.
async fn proxy(sites: &[(&str, &SimSite)], interval: Duration) -> (Proxy, PathBuf) {
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let list = sites.iter().map(|(n, s)| (*n, s.address(), fast_params())).collect();
    let mut config = test_config(dir.path(), list);
    let inv = dir.path().join("inventory");
    config.inventory = Some(InventoryConfig {
        interval,
        full_interval: Duration::from_secs(3600),
        ..InventoryConfig::new(inv.clone())
    });
    let p = Proxy::start_config(dir, config).await;
    for (n, _) in sites {
        p.wait_state(n, SiteState::Ready).await;
    }
    (p, inv)
}

/// Wait until the site's inventory status satisfies `cond`.
async fn eventually_inv(
    p: &Proxy,
    site: &str,
    what: &str,
    cond: impl Fn(&InventorySnapshot) -> bool,
) -> InventorySnapshot {
    let h = p.site(site);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let s = h.inventory_status().expect("inventory configured");
        if cond(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}; status: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until `path` holds `content`.
async fn eventually_file(path: &Path, content: &[u8]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while std::fs::read(path).ok().as_deref() != Some(content) {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {} to be written", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The site's tree of host `i`.
fn tree(s: &SimSite, i: usize) -> (String, Option<Tree>) {
    s.with_dataset(|ds| {
        let name = ds.host_name(i);
        let t = ds.inventory.tree(i, &name);
        (name, t)
    })
}

/// Assert the directory holds host `i`'s files exactly as the site has them.
fn assert_synced(s: &SimSite, dir: &Path, i: usize) {
    let (name, t) = tree(s, i);
    let t = t.expect("host has a tree");
    let (plain, gz) = t.file_names(&name);
    for (file, want) in [(plain, &t.plain), (gz, &t.gz)] {
        let path = dir.join(&file);
        let got = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(got == *want, "{file} differs from the site's ({} vs {} bytes)", got.len(), want.len());
        let mtime = std::fs::metadata(&path).expect("metadata").mtime();
        assert_eq!(mtime, t.mtime, "{file} has the site's timestamp");
    }
}

/// Names in the directory, sorted (the manifest directory left out).
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".livemux")
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn the_first_sync_writes_every_host_byte_identical_with_the_sites_timestamps() {
    let s = sim("inv1").await;
    // Bytes of every value, quotes and backslashes: the python3 decoding
    // has to be exact.
    let odd = Tree { mtime: 1_700_000_500, plain: (0..=255u8).collect(), gz: Vec::new(), layout: Layout::Legacy };
    s.with_dataset(|ds| {
        ds.inventory.tree_bytes = 20_000;
        ds.inventory.set_quietly(7, Some(Tree { gz: livemux_simsite::inventory::gzip(&odd.plain), ..odd.clone() }));
    });
    let (p, dir) = proxy(&[("inv1", &s)], Duration::from_millis(200)).await;
    let st = eventually_inv(&p, "inv1", "100 hosts synced", |st| st.hosts == 100 && st.state == "idle").await;
    assert_eq!(st.last_error, None);
    assert!(st.last_sync.is_some());
    for i in 0..100 {
        assert_synced(&s, &dir, i);
    }
    // 99 hosts in the current layout (2 files each), one legacy (2 files).
    let names = listing(&dir);
    assert_eq!(names.len(), 200, "{names:?}");
    assert!(names.contains(&"host-0007".to_owned()) && names.contains(&"host-0007.gz".to_owned()));
    assert!(names.contains(&"host-0000.json".to_owned()) && names.contains(&"host-0000.json.gz".to_owned()));
    // The state file shows it.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p.config.state_file).expect("state file")).expect("json");
    let entry = &state["sites"][0]["inventory"];
    assert!(entry["state"] == "idle" || entry["state"] == "running", "{entry}");
    p.shutdown().await;
}

#[tokio::test]
async fn updates_are_picked_up_removed_hosts_lose_their_files_and_foreign_files_stay() {
    let s = sim("inv2").await;
    let (p, dir) = proxy(&[("inv2", &s)], Duration::from_millis(100)).await;
    eventually_inv(&p, "inv2", "first sync", |st| st.hosts == 100).await;
    std::fs::write(dir.join("central-host.json"), b"{}\n").expect("foreign file");
    std::fs::write(dir.join(".last"), b"").expect("foreign file");
    let before = listing(&dir);

    let name3 = tree(&s, 3).0;
    let v2 = generate(&name3, Layout::Current, 4000, "v2", 1_800_000_000);
    let removed_at = 1_800_000_001;
    s.with_dataset(|ds| {
        ds.inventory.set(3, Some(v2.clone()), removed_at);
        ds.inventory.set(5, None, removed_at);
    });
    eventually_file(&dir.join(format!("{name3}.json")), &v2.plain).await;
    eventually_inv(&p, "inv2", "host 5 removed", |st| st.hosts == 99).await;
    assert_synced(&s, &dir, 3);
    let after = listing(&dir);
    let gone: Vec<_> = before.iter().filter(|n| !after.contains(n)).collect();
    assert_eq!(gone, vec!["host-0005.json", "host-0005.json.gz"]);
    assert!(after.contains(&"central-host.json".to_owned()) && after.contains(&".last".to_owned()));

    // The site moves a host to the legacy layout: the old layout's files
    // (livemux's own) go.
    let legacy = generate(&name3, Layout::Legacy, 4000, "v3", 1_800_000_010);
    s.with_dataset(|ds| ds.inventory.set(3, Some(legacy.clone()), 0));
    eventually_file(&dir.join(&name3), &legacy.plain).await;
    assert_synced(&s, &dir, 3);
    let names = listing(&dir);
    assert!(!names.contains(&format!("{name3}.json")) && !names.contains(&format!("{name3}.json.gz")), "{names:?}");
    p.shutdown().await;
}

#[tokio::test]
async fn a_save_in_the_same_second_as_the_previous_sync_is_picked_up() {
    // liveproxyd's 2024 fix: a tree saved in the second the sync ran keeps
    // both timestamps (the host's and the site's `.last`) unchanged.
    let s = sim("inv3").await;
    let (p, dir) = proxy(&[("inv3", &s)], Duration::from_secs(1)).await;
    eventually_inv(&p, "inv3", "first sync", |st| st.hosts == 100).await;
    let name = tree(&s, 2).0;
    let second = 1_800_000_000;
    let v1 = generate(&name, Layout::Current, 3000, "v1", second);
    s.with_dataset(|ds| ds.inventory.set(2, Some(v1.clone()), second));
    eventually_file(&dir.join(format!("{name}.json")), &v1.plain).await;
    // Saved again within the same second, right after the sync read it.
    let v2 = generate(&name, Layout::Current, 3000, "v2", second);
    s.with_dataset(|ds| ds.inventory.set(2, Some(v2.clone()), second));
    assert_eq!(s.with_dataset(|ds| ds.inventory.last), second, "the probe value did not change");
    eventually_file(&dir.join(format!("{name}.json")), &v2.plain).await;
    assert_synced(&s, &dir, 2);
    p.shutdown().await;
}

#[tokio::test]
async fn hostile_names_are_never_written_and_a_corrupt_gz_keeps_the_old_files() {
    let s = sim("inv4").await;
    s.with_dataset(|ds| {
        ds.rename_host(1, "../escape");
        ds.rename_host(2, ".hidden");
        ds.rename_host(3, "a/b");
        ds.rename_host(4, "x..y");
    });
    let (p, dir) = proxy(&[("inv4", &s)], Duration::from_millis(100)).await;
    eventually_inv(&p, "inv4", "first sync", |st| st.hosts == 96).await;
    let parent = dir.parent().expect("parent");
    assert!(!parent.join("escape.json").exists() && !parent.join("escape").exists());
    let names = listing(&dir);
    assert!(names.iter().all(|n| n.starts_with("host-")), "{names:?}");
    assert!(!dir.join("a").exists());

    // Host 6 gets a newer tree whose .gz is not gzip; host 8 a good one.
    let (name6, old6) = tree(&s, 6);
    let old6 = old6.expect("tree");
    let bad = Tree {
        gz: b"\x1f\x8bnot really gzip".to_vec(),
        ..generate(&name6, Layout::Current, 500, "bad", 1_800_000_000)
    };
    let name8 = tree(&s, 8).0;
    let good = generate(&name8, Layout::Current, 500, "good", 1_800_000_000);
    s.with_dataset(|ds| {
        ds.inventory.set(6, Some(bad), 1_800_000_000);
        ds.inventory.set(8, Some(good.clone()), 1_800_000_000);
    });
    eventually_file(&dir.join(format!("{name8}.json")), &good.plain).await;
    eventually_file(&dir.join(format!("{name8}.json.gz")), &good.gz).await;
    // The same batch carried host 6: its files are the old ones.
    assert_eq!(std::fs::read(dir.join(format!("{name6}.json"))).expect("kept"), old6.plain);
    assert_eq!(std::fs::read(dir.join(format!("{name6}.json.gz"))).expect("kept"), old6.gz);
    let mtime = std::fs::metadata(dir.join(format!("{name6}.json"))).expect("meta").mtime();
    assert_eq!(mtime, old6.mtime);
    // (The batch may still be finishing its last file when host 8's appear.)
    crate::support::eventually("no temporary file left", || {
        listing(&dir).iter().all(|n| !n.starts_with(".livemux-tmp-"))
    })
    .await;
    p.shutdown().await;
}

#[tokio::test]
async fn a_site_failing_mid_answer_leaves_no_partial_file_and_the_sync_resumes() {
    let s = sim("inv5").await;
    s.with_dataset(|ds| ds.inventory.tree_bytes = 10_000);
    // The listing (a few KiB) passes; the answer with the trees is cut in
    // the middle of the first host's.
    s.set_knobs(|k| {
        k.fault_table = Some("hosts".into());
        k.close_after_bytes = Some(8_000);
    });
    let (p, dir) = proxy(&[("inv5", &s)], Duration::from_millis(100)).await;
    let st = eventually_inv(&p, "inv5", "a failed sync", |st| st.state == "failed").await;
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("closed")), "{st:?}");
    assert_eq!(listing(&dir), Vec::<String>::new(), "no partial or temporary file");
    assert_eq!(st.hosts, 0);
    s.set_knobs(|k| {
        k.close_after_bytes = None;
        k.fault_table = None;
    });
    eventually_inv(&p, "inv5", "all synced", |st| st.hosts == 100 && st.state == "idle").await;
    for i in 0..100 {
        assert_synced(&s, &dir, i);
    }
    p.shutdown().await;
}

#[tokio::test]
async fn the_same_host_name_on_two_sites_stays_with_the_site_that_wrote_it_first() {
    let a = sim("inva").await;
    let b = sim("invb").await;
    b.with_dataset(|ds| ds.inventory.layout = Layout::Legacy);
    let (p, dir) = proxy(&[("inva", &a), ("invb", &b)], Duration::from_millis(100)).await;
    // Both sites name their hosts host-0000..host-0099: whichever site
    // wrote a host first keeps it; never both layouts of one host.
    let owned = |p: &Proxy| {
        let (sa, sb) = (p.site("inva").inventory_status(), p.site("invb").inventory_status());
        let (sa, sb) = (sa.expect("a"), sb.expect("b"));
        (sa.last_sync.is_some() && sb.last_sync.is_some()).then_some(sa.hosts + sb.hosts)
    };
    crate::support::eventually("both sites synced", || owned(&p).is_some()).await;
    assert_eq!(owned(&p), Some(100), "each host has exactly one owner");
    let names = listing(&dir);
    assert_eq!(names.len(), 200, "{names:?}");
    for i in 0..100 {
        let name = tree(&a, i).0;
        let current = dir.join(format!("{name}.json")).exists();
        let legacy = dir.join(&name).exists();
        assert!(current != legacy, "{name}: exactly one site's files");
    }
    p.shutdown().await;
}

#[tokio::test]
async fn a_site_opted_out_is_off_and_not_asked() {
    let s = sim("inv6").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let params = SiteParams { inventory: false, ..fast_params() };
    let mut config = test_config(dir.path(), vec![("inv6", s.address(), params)]);
    config.inventory =
        Some(InventoryConfig { interval: Duration::from_millis(50), ..InventoryConfig::new(dir.path().join("inv")) });
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("inv6", SiteState::Ready).await;
    eventually_inv(&p, "inv6", "off", |st| st.state == "off").await;
    crate::support::query(&p, "inv6", "GET status\nColumns: program_start").await;
    assert!(
        s.requests().iter().all(|r| !String::from_utf8_lossy(r).contains("mk_inventory")),
        "an opted-out site is never asked for inventory"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn a_core_without_inventory_columns_is_switched_off_once_and_serves_queries_as_before() {
    let s = sim("inv7").await;
    s.with_dataset(|ds| ds.inventory.enabled = false);
    let (p, dir) = proxy(&[("inv7", &s)], Duration::from_millis(50)).await;
    let st = eventually_inv(&p, "inv7", "off", |st| st.state == "off").await;
    assert!(st.last_error.as_deref().is_some_and(|e| e.contains("mk_inventory_last")), "{st:?}");
    let (code, body) = crate::support::query(&p, "inv7", "GET hosts\nColumns: name\nLimit: 2").await;
    assert_eq!((code, body.as_str()), (200, "host-0000\nhost-0001\n"));
    // Asked once, not every interval (50 ms): let three heartbeats (300 ms
    // each) pass.
    let h = p.site("inv7");
    let beats = h.status().heartbeats;
    tokio::time::timeout(PATIENCE, h.wait_for(|st| st.heartbeats >= beats + 3)).await.expect("heartbeats go on");
    let probes = s.requests().iter().filter(|r| String::from_utf8_lossy(r).contains("mk_inventory")).count();
    assert_eq!(probes, 1);
    assert_eq!(listing(&dir), Vec::<String>::new());
    p.shutdown().await;
}

#[tokio::test]
async fn an_unusable_directory_fails_the_sync_clearly_and_it_recovers_once_fixed() {
    let s = sim("inv8").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let inv = dir.path().join("inventory");
    // A file where the directory should be.
    std::fs::write(&inv, b"not a directory").expect("file");
    let mut config = test_config(dir.path(), vec![("inv8", s.address(), fast_params())]);
    config.inventory =
        Some(InventoryConfig { interval: Duration::from_millis(100), ..InventoryConfig::new(inv.clone()) });
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("inv8", SiteState::Ready).await;
    let st = eventually_inv(&p, "inv8", "failed", |st| st.state == "failed").await;
    let why = st.last_error.unwrap_or_default();
    assert!(why.contains(&inv.display().to_string()) && why.contains("cannot create"), "{why}");
    // The proxy serves queries all the same.
    let (code, _) = crate::support::query(&p, "inv8", "GET status\nColumns: num_hosts").await;
    assert_eq!(code, 200);
    std::fs::remove_file(&inv).expect("remove");
    eventually_inv(&p, "inv8", "synced once the directory can be made", |st| st.hosts == 100).await;
    assert_synced(&s, &inv, 0);
    p.shutdown().await;
}

/// A tmpfs of `bytes` mounted on `path` until dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: &Path, bytes: usize) -> std::io::Result<SmallDisk> {
        use nix::mount::{MsFlags, mount};
        std::fs::create_dir_all(path)?;
        let opts = format!("size={bytes},mode=0755");
        mount(Some("tmpfs"), path, Some("tmpfs"), MsFlags::empty(), Some(opts.as_str()))
            .map_err(std::io::Error::from)?;
        Ok(SmallDisk(path.to_owned()))
    }

    /// Give it room: the same files, a larger size.
    fn grow(&self, bytes: usize) -> std::io::Result<()> {
        use nix::mount::{MsFlags, mount};
        let opts = format!("size={bytes}");
        mount(None::<&str>, &self.0, None::<&str>, MsFlags::MS_REMOUNT, Some(opts.as_str()))
            .map_err(std::io::Error::from)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_sync_without_a_partial_file_and_it_resumes_when_there_is_room() {
    const TEST: &str = "inventory::a_full_disk_fails_the_sync_without_a_partial_file";
    if !nix::unistd::geteuid().is_root() {
        return crate::support::skip(TEST, "mounting a small tmpfs needs root");
    }
    let s = sim("inv9").await;
    s.with_dataset(|ds| ds.inventory.tree_bytes = 8000);
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").expect("tempdir");
    let inv = dir.path().join("inventory");
    // Room for about a third of the 100 hosts' files.
    let disk = match SmallDisk::mount(&inv, 400 * 1024) {
        Ok(d) => d,
        Err(e) => return crate::support::skip(TEST, &format!("cannot mount a tmpfs: {e}")),
    };
    let mut config = test_config(dir.path(), vec![("inv9", s.address(), fast_params())]);
    config.inventory =
        Some(InventoryConfig { interval: Duration::from_millis(100), ..InventoryConfig::new(inv.clone()) });
    let p = Proxy::start_config(dir, config).await;
    p.wait_state("inv9", SiteState::Ready).await;
    let st = eventually_inv(&p, "inv9", "failed on a full disk", |st| st.state == "failed").await;
    let why = st.last_error.unwrap_or_default();
    assert!(why.contains("No space left on device"), "{why}");
    let names = listing(&inv);
    assert!(names.iter().all(|n| !n.starts_with(".livemux-tmp-")), "no temporary file left: {names:?}");
    assert!(!names.is_empty() && names.len() < 200, "{} files", names.len());
    // Every file that is there is complete and has its timestamp.
    for i in 0..100 {
        let (name, t) = tree(&s, i);
        let t = t.expect("tree");
        for (file, want) in [(format!("{name}.json"), &t.plain), (format!("{name}.json.gz"), &t.gz)] {
            if let Ok(got) = std::fs::read(inv.join(&file)) {
                assert!(got == *want, "{file} is complete");
            }
        }
    }
    // Room again: the sync completes.
    disk.grow(64 << 20).expect("remount larger");
    eventually_inv(&p, "inv9", "synced with room", |st| st.hosts == 100 && st.state == "idle").await;
    for i in 0..100 {
        assert_synced(&s, &inv, i);
    }
    p.shutdown().await;
    drop(disk);
}
