//! Certificates made at test time (rcgen) and stunnel, the TLS terminator
//! Checkmk sites put in front of their core.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything the TLS tests need, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA livemux trusts (ca_file), and its key.
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// Server certificate for localhost/127.0.0.1, signed by `ca`.
    pub server: Pair,
    /// The same, expired.
    pub expired: Pair,
    /// A CA livemux does not trust, and a server certificate it signed.
    pub rogue_ca: PathBuf,
    pub rogue_server: Pair,
    /// The CA the site trusts for client certificates, and one it signed.
    pub client_ca: PathBuf,
    pub client: Pair,
    /// A client certificate signed by the rogue CA.
    pub rogue_client: Pair,
    /// Client certificates signed by `client_ca`: expired, and for the
    /// name `thruk`.
    pub expired_client: Pair,
    pub thruk_client: Pair,
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn new(name: &str) -> (Ca, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("self-signed CA").pem();
        (Ca { params, key }, pem)
    }

    fn sign(&self, cn: &str, expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("signed leaf");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write PEM");
    p
}

fn pair(dir: &Path, name: &str, (cert, key): (String, String)) -> Pair {
    Pair { cert: write(dir, &format!("{name}.pem"), &cert), key: write(dir, &format!("{name}.key"), &key) }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new().prefix("lmpki").tempdir_in("/tmp").expect("tempdir");
        let d = dir.path();
        let (ca, ca_pem) = Ca::new("livemux test CA");
        let (rogue, rogue_pem) = Ca::new("rogue CA");
        let (cca, cca_pem) = Ca::new("client CA");
        Pki {
            ca: write(d, "ca.pem", &ca_pem),
            ca_key: write(d, "ca.key", &ca.key_pem()),
            server: pair(d, "server", ca.sign("site1.example", false)),
            expired: pair(d, "expired", ca.sign("old-site.example", true)),
            rogue_ca: write(d, "rogue-ca.pem", &rogue_pem),
            rogue_server: pair(d, "rogue-server", rogue.sign("impostor.example", false)),
            client_ca: write(d, "client-ca.pem", &cca_pem),
            client: pair(d, "client", cca.sign("livemux-central", false)),
            rogue_client: pair(d, "rogue-client", rogue.sign("intruder", false)),
            expired_client: pair(d, "expired-client", cca.sign("old-gui", true)),
            thruk_client: pair(d, "thruk-client", cca.sign("thruk", false)),
            dir,
        }
    }
}

impl Pki {
    /// A server certificate in X.509 version 1 form (no extensions), signed
    /// by `ca`: what `openssl x509 -req` makes without an extensions file.
    pub fn v1_server(&self) -> Pair {
        let d = self.dir.path();
        let key = KeyPair::generate().expect("leaf key");
        let pair = Pair { cert: d.join("v1.pem"), key: write(d, "v1.key", &key.serialize_pem()) };
        let csr = d.join("v1.csr");
        let run = |args: &[&std::ffi::OsStr]| {
            let out = Command::new("openssl").args(args).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&[
            "req".as_ref(),
            "-new".as_ref(),
            "-key".as_ref(),
            pair.key.as_os_str(),
            "-subj".as_ref(),
            "/CN=v1-site.example".as_ref(),
            "-out".as_ref(),
            csr.as_os_str(),
        ]);
        run(&[
            "x509".as_ref(),
            "-req".as_ref(),
            "-in".as_ref(),
            csr.as_os_str(),
            "-CA".as_ref(),
            self.ca.as_os_str(),
            "-CAkey".as_ref(),
            self.ca_key.as_os_str(),
            "-set_serial".as_ref(),
            "7".as_ref(),
            "-days".as_ref(),
            "30".as_ref(),
            "-out".as_ref(),
            pair.cert.as_os_str(),
        ]);
        pair
    }
}

/// stunnel in front of a plaintext Livestatus endpoint.
pub struct Stunnel {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Stunnel {
    /// Serve TLS on a free port with `server`, forwarding to `backend`;
    /// with `client_ca`, clients must present a certificate it signed.
    pub fn start(backend: SocketAddr, server: &Pair, client_ca: Option<&Path>) -> Stunnel {
        for _ in 0..5 {
            let dir = tempfile::Builder::new().prefix("lmst").tempdir_in("/tmp").expect("tempdir");
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut conf = format!(
                "foreground = yes\npid =\ndebug = warning\n[livestatus]\naccept = 127.0.0.1:{port}\n\
                 connect = {backend}\ncert = {}\nkey = {}\nsslVersionMin = TLSv1.2\n",
                server.cert.display(),
                server.key.display()
            );
            if let Some(ca) = client_ca {
                conf.push_str(&format!("verifyChain = yes\nrequireCert = yes\nCAfile = {}\n", ca.display()));
            }
            let path = dir.path().join("stunnel.conf");
            std::fs::File::create(&path).and_then(|mut f| f.write_all(conf.as_bytes())).expect("write config");
            let mut child = Command::new("stunnel4")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run stunnel4 (install it: scripts/install-test-deps.sh)");
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Stunnel { child, port, _dir: dir };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("stunnel4 did not start");
    }

    pub fn address(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
