//! [`LocalEtcd`]: a real single-member etcd (Debian's `etcd-server`, `/usr/bin/etcd`) on
//! loopback ports in a scratch directory, for the tests and the fault campaign that need the
//! store a cluster would use. It can be stopped and started again on the same ports and data
//! (an outage), and is killed when dropped.

use std::fs::{self, File};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::StoreError;

/// Where Debian's `etcd-server` puts the binary.
pub const ETCD: &str = "/usr/bin/etcd";

/// A local etcd process.
pub struct LocalEtcd {
    child: Option<Child>,
    /// `etcd://127.0.0.1:PORT`, for [`super::open`] and `--state`.
    pub url: String,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

impl LocalEtcd {
    /// Starts etcd on two free loopback ports and waits until it answers (at most 20 s).
    pub async fn start() -> Result<LocalEtcd, StoreError> {
        if !Path::new(ETCD).exists() {
            return Err(StoreError::Backend(format!(
                "{ETCD} is missing: this needs a real etcd (Debian's etcd-server); run `make setup`"
            )));
        }
        let dir = tempfile::TempDir::new().map_err(StoreError::io("a scratch directory"))?;
        let [client_port, peer_port] = free_ports()?;
        let mut etcd = LocalEtcd {
            child: None,
            url: format!("etcd://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            dir,
        };
        etcd.resume().await?;
        Ok(etcd)
    }

    /// The log etcd writes.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Kills etcd (SIGKILL): its clients see an outage. Its data stays for [`Self::resume`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again (or the first time) on the same ports and data, and waits until it
    /// answers.
    pub async fn resume(&mut self) -> Result<(), StoreError> {
        self.kill();
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(StoreError::io(self.log()))?;
        let child = Command::new(ETCD)
            .args(["--name", "default", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(log.try_clone().map_err(StoreError::io(self.log()))?)
            .stderr(log)
            .spawn()
            .map_err(StoreError::io(ETCD))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(self.failure(format!("etcd exited at start ({status})")));
            }
            let why = if TcpStream::connect(("127.0.0.1", self.client_port)).is_ok() {
                match super::open(&self.url).await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                }
            } else {
                "not listening".to_owned()
            };
            if Instant::now() > deadline {
                return Err(self.failure(format!("etcd did not answer within 20 s: {why}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn failure(&self, why: String) -> StoreError {
        let log = fs::read_to_string(self.log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        StoreError::Backend(format!(
            "{why}; the end of etcd's log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `N` distinct loopback ports that were free a moment ago.
pub fn free_ports<const N: usize>() -> Result<[u16; N], StoreError> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(StoreError::io("127.0.0.1:0"))?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(StoreError::io("127.0.0.1:0"))?;
    Ok(ports.try_into().expect("N ports"))
}
