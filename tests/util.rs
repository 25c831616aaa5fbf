//! Test harness: a unique temp home, the built binary run under a name, and
//! free ports. Nothing here asserts; tests do.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_clup");

/// The binary the lab's monitors run: `CLUP_LAB_BIN` when set (scripts/test
/// sets it to the static musl release build, `panic = "abort"`, the binary
/// users install, so a panic in a probe thread ends the server in CI as it
/// would in production), else the test build.
pub fn lab_bin() -> String {
    match std::env::var("CLUP_LAB_BIN") {
        Ok(b) if !b.is_empty() => {
            assert!(Path::new(&b).is_file(), "CLUP_LAB_BIN={b} is not a file");
            b
        }
        _ => BIN.to_string(),
    }
}

/// A clup home in a fresh temp directory, removed on drop.
pub struct TestHome {
    pub root: PathBuf,
}

impl TestHome {
    pub fn new(tag: &str) -> TestHome {
        let root = std::env::temp_dir().join(format!("clup-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("conf")).unwrap();
        TestHome { root }
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }

    /// Run `clup <args>` with CLUP_HOME set to this home.
    pub fn run(&self, args: &[&str]) -> Out {
        self.run_stdin(args, None)
    }

    pub fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Out {
        run_in(&self.root, args, stdin)
    }
}

impl Drop for TestHome {
    fn drop(&mut self) {
        // Stop a server a failed test may have left behind, by its own pid.
        if let Ok(pid) = std::fs::read_to_string(self.root.join("run/clupserver.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                if run_in(&self.root, &["server", "status"], None).code == 0 {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The result of a command, with its streams as text.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Out {
    fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub fn run_in(home: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    use std::io::Write;
    let mut c = Command::new(BIN);
    c.args(args)
        .env("CLUP_HOME", home)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn clup");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child.wait_with_output().expect("wait clup").into()
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The manual's clup.conf, listening on loopback at `port`.
pub fn sample_conf(port: u16) -> String {
    format!(
        "# test config\n\
network=127.0.56.0\n\
ha_rpc_pass = csha_cluster_pass\n\
probe_db_name = cs_sys_ha\n\
probe_user = postgres\n\
probe_password = postgres\n\
ha_db_user = postgres\n\
ha_db_pass = postgres\n\
db_repl_user = postgres\n\
db_repl_pass = postgres\n\
probe_interval = 10\n\
lock_ttl = 30\n\
http_token = 540cd628-d74e-11e7-992e-60f81dd129c2\n\
cstlb_token = 8e722522-d733-11e7-93e8-60f81dd129c2\n\
http_listen = 127.0.0.1\n\
http_port = {port}\n"
    )
}

/// The manual's init.json (cluster01, four databases) on loopback addresses
/// (127.0.56.x) so a running monitor never sends anything off this machine,
/// and frozen, so it does not act on hosts that do not exist.
pub const SAMPLE_INIT: &str = include_str!("data/init.json");

/// Poll `f` every 50 ms for up to `secs`; true as soon as it holds.
pub fn wait_for(secs: u64, f: impl FnMut() -> bool) -> bool {
    wait_every(secs, 50, f)
}

/// Poll `f` every `ms` for up to `secs`; true as soon as it holds.
pub fn wait_every(secs: u64, ms: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    f()
}

/// GET on 127.0.0.1:`port` with an optional header: status, Content-Type, body.
pub fn http_get(port: u16, path: &str, header: Option<(&str, &str)>) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(&format!("http://127.0.0.1:{port}{path}"));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let mut r = req.call().unwrap();
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (
        r.status().as_u16(),
        ctype,
        r.body_mut().read_to_string().unwrap(),
    )
}
