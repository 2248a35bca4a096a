//! A real etcd on loopback ports (Debian's `etcd-server`; `.ci/run` installs it), for the tests
//! of the etcd state backend, replicas and releases: started, stopped (SIGSTOP/SIGCONT), killed
//! and restarted on the same ports and data directory. Its log is `<dir>.log`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Value};

use super::{client, eventually, free_port, request};

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
        // A free port is released before etcd binds it, and a test beside this one can take
        // it meanwhile: etcd then exits at once ("address already in use"), and is started
        // again on other ports.
        for _ in 0..5 {
            e.spawn();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::time::Instant::now() < deadline {
                let exited = e
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if exited {
                    break;
                }
                if e.ready().await {
                    return e;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            e.stop();
            // A member it got as far as creating would name the old peer port for good.
            let _ = std::fs::remove_dir_all(&e.dir);
            e.client = free_port();
            e.peer = free_port();
        }
        e.spawn();
        e.wait_ready().await;
        e
    }

    /// Whether this etcd answers a read now: the one answering on the client port must list
    /// this peer port as its member (another test's etcd may hold the port).
    async fn ready(&self) -> bool {
        let post = |path: &str, body: &'static str| {
            let req = http::Request::post(format!("{}{path}", self.endpoint()))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("req");
            tokio::time::timeout(Duration::from_secs(1), client().request(req))
        };
        let read = matches!(
            post("/v3/kv/range", r#"{"key":"AA=="}"#).await,
            Ok(Ok(r)) if r.status() == 200
        );
        if !read {
            return false;
        }
        let Ok(Ok(r)) = post("/v3/cluster/member/list", "{}").await else {
            return false;
        };
        let Ok(body) = http_body_util::BodyExt::collect(r.into_body()).await else {
            return false;
        };
        let ours = format!("\"http://127.0.0.1:{}\"", self.peer);
        String::from_utf8_lossy(&body.to_bytes()).contains(&ours)
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
        // A loaded machine (load average 12 on 2 cores was seen) can take a while.
        let ok = eventually(60, || self.ready()).await;
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

/// A key or value as etcd's JSON gateway takes it: base64.
pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The `[state]` section for the etcd backend at `endpoint` under `prefix`, then `rest` (more
/// `[state]` keys, the services).
pub fn etcd_state(endpoint: &str, prefix: &str, rest: &str) -> String {
    format!(
        "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"{endpoint}\"]\netcd_prefix = \"{prefix}\"\n{rest}"
    )
}

impl Etcd {
    /// etcd's JSON gateway: `path` with `body`, answered 200; its answer.
    pub async fn call(&self, path: &str, body: Value) -> Value {
        let (s, v) = request(
            self.addr(),
            "POST",
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        serde_json::from_str(&v).expect("etcd answers JSON")
    }

    /// The JSON value `key` holds (Null when it is absent or holds no JSON).
    pub async fn held(&self, key: &str) -> Value {
        let r = self.call("/v3/kv/range", json!({ "key": b64(key) })).await;
        r["kvs"][0]["value"]
            .as_str()
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or(Value::Null)
    }

    /// Deletes `key`; etcd's answer (`deleted` is `"1"` when it was there).
    pub async fn delete(&self, key: &str) -> Value {
        self.call("/v3/kv/deleterange", json!({ "key": b64(key) }))
            .await
    }

    /// Raises (true) or clears etcd's NOSPACE alarm, through its API: while it is raised, etcd
    /// refuses every write.
    pub async fn nospace(&self, raised: bool) {
        let member =
            self.call("/v3/maintenance/status", json!({})).await["header"]["member_id"].clone();
        let action = if raised { "ACTIVATE" } else { "DEACTIVATE" };
        let alarm = json!({ "action": action, "memberID": member, "alarm": "NOSPACE" });
        self.call("/v3/maintenance/alarm", alarm).await;
    }
}
