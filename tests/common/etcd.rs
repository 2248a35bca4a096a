//! A real etcd on loopback ports (Debian's `etcd-server`; `.ci/run` installs it), for the tests
//! of the etcd state backend, replicas and releases: started, stopped (SIGSTOP/SIGCONT), killed
//! and restarted on the same ports and data directory. Its log is `<dir>.log`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use super::{client, eventually, free_port};

pub struct Etcd {
    pub child: Option<Child>,
    pub client: u16,
    pub peer: u16,
    pub dir: std::path::PathBuf,
}

impl Etcd {
    pub async fn start(dir: &std::path::Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            client: free_port(),
            peer: free_port(),
            dir: dir.to_path_buf(),
        };
        e.spawn();
        e.wait_ready().await;
        e
    }

    pub fn spawn(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.with_extension("log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        self.child = Some(child);
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client))
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("etcd running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill {sig} {pid}");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process must be continued to die of SIGKILL promptly and be reaped.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn wait_ready(&self) {
        let url = format!("{}/v3/kv/range", self.endpoint());
        // A loaded machine (load average 12 on 2 cores was seen) can take a while.
        let ok = eventually(60, || {
            let url = url.clone();
            async move {
                let req = http::Request::post(url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(r#"{"key":"AA=="}"#)))
                    .expect("req");
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), client().request(req)).await,
                    Ok(Ok(r)) if r.status() == 200
                )
            }
        })
        .await;
        if !ok {
            let log = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
            let tail: String = log
                .chars()
                .rev()
                .take(3000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!("etcd did not start:\n{tail}");
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Etcd {
    /// The running process's id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}
