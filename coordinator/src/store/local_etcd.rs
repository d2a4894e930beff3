//! [`LocalEtcd`]: a real etcd (Debian's `etcd-server`, `/usr/bin/etcd`) on loopback ports in a
//! scratch directory, for the tests and the fault campaign that need the store a cluster would
//! use: one member ([`LocalEtcd::start`]) or a cluster of several ([`LocalEtcd::cluster`]).
//! Each member can be stopped and started again on the same ports and data (an outage), and is
//! killed when dropped.

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
    /// The member's name, and the cluster's members as `--initial-cluster` lists them.
    name: String,
    initial_cluster: String,
}

impl LocalEtcd {
    /// Starts etcd on two free loopback ports and waits until it answers (at most 20 s).
    pub async fn start() -> Result<LocalEtcd, StoreError> {
        let mut members = Self::members(1)?;
        let mut etcd = members.pop().expect("one member");
        etcd.resume().await?;
        Ok(etcd)
    }

    /// Starts a cluster of `n` members on loopback ports and waits until each answers (at most
    /// 20 s). Each member's `url` names that member alone; [`cluster_url`] names them all.
    pub async fn cluster(n: usize) -> Result<Vec<LocalEtcd>, StoreError> {
        let mut members = Self::members(n)?;
        // No member answers before a quorum runs: start every one, then wait for each.
        for m in &mut members {
            m.spawn()?;
        }
        for m in &mut members {
            m.ready().await?;
        }
        Ok(members)
    }

    fn members(n: usize) -> Result<Vec<LocalEtcd>, StoreError> {
        if !Path::new(ETCD).exists() {
            return Err(StoreError::Backend(format!(
                "{ETCD} is missing: this needs a real etcd (Debian's etcd-server); run `make setup`"
            )));
        }
        let ports: Vec<[u16; 2]> = (0..n).map(|_| free_ports()).collect::<Result<_, _>>()?;
        let name = |i: usize| {
            if n == 1 {
                "default".to_owned()
            } else {
                format!("m{i}")
            }
        };
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, [_, peer])| format!("{}=http://127.0.0.1:{peer}", name(i)))
            .collect::<Vec<_>>()
            .join(",");
        ports
            .iter()
            .enumerate()
            .map(|(i, &[client_port, peer_port])| {
                Ok(LocalEtcd {
                    child: None,
                    url: format!("etcd://127.0.0.1:{client_port}"),
                    client_port,
                    peer_port,
                    dir: tempfile::TempDir::new().map_err(StoreError::io("a scratch directory"))?,
                    name: name(i),
                    initial_cluster: initial_cluster.clone(),
                })
            })
            .collect()
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
        self.spawn()?;
        self.ready().await
    }

    /// Starts the process (killing the one running).
    fn spawn(&mut self) -> Result<(), StoreError> {
        self.kill();
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log())
            .map_err(StoreError::io(self.log()))?;
        let child = Command::new(ETCD)
            .args(["--name", &self.name, "--data-dir"])
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
            .args(["--initial-cluster", &self.initial_cluster])
            .stdout(log.try_clone().map_err(StoreError::io(self.log()))?)
            .stderr(log)
            .spawn()
            .map_err(StoreError::io(ETCD))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the member answers (at most 20 s).
    async fn ready(&mut self) -> Result<(), StoreError> {
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

/// `etcd://` naming every member of `cluster` (a client fails over between them).
pub fn cluster_url(cluster: &[LocalEtcd]) -> String {
    let hosts: Vec<&str> = cluster
        .iter()
        .map(|m| m.url.trim_start_matches("etcd://"))
        .collect();
    format!("etcd://{}", hosts.join(","))
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
