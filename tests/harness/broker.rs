//! A broker of the test's own, run as a process that a test can pause, kill
//! and restart on its data.

use std::time::Duration;

use crate::eventually;

/// A broker of the test's own (the pinned nisshi) that keeps its data in a
/// SQLite file of the test's scratch directory, as the local stack's
/// persistent broker does: the test may stop it (SIGSTOP: the process stands still, every
/// connection hangs) and start it again (SIGCONT), or SIGKILL it and start a
/// new process on the same port and file, as a broker that crashed and came
/// back with its topics, records and consumer offsets.
#[derive(Debug)]
pub struct OwnBroker {
    pub addr: String,
    /// Where its SQLite file lives (its working directory).
    dir: std::path::PathBuf,
    child: std::process::Child,
}

impl OwnBroker {
    /// Start a broker on a free loopback port, its data in `dir`.
    pub async fn start(dir: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let addr = format!("127.0.0.1:{port}");
        let dir = dir.to_owned();
        let child = Self::spawn(&addr, &dir);
        let broker = Self { addr, dir, child };
        broker.wait_listening().await;
        // Indexed as the local stack's is (scripts/index-broker-storage.py
        // says why), so the tests meet the broker users run.
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/index-broker-storage.py");
        let indexed = std::process::Command::new("python3")
            .arg(script)
            .arg(broker.dir.join("broker.db"))
            .status()
            .expect("python3 runs scripts/index-broker-storage.py");
        assert!(indexed.success(), "the broker's storage is indexed");
        broker
    }

    fn spawn(addr: &str, dir: &std::path::Path) -> std::process::Child {
        let url = format!("tcp://{addr}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("broker.log"))
            .expect("broker log file");
        std::process::Command::new("nisshi")
            .current_dir(dir)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // A path relative to the working directory (see scripts/lib.sh).
            .args(["--storage-engine", "sqlite://broker.db"])
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("nisshi on PATH (scripts/test.sh installs it)")
    }

    async fn wait_listening(&self) {
        let addr = self.addr.clone();
        eventually("the broker to listen", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(&addr).await.ok().map(drop)
        })
        .await;
    }

    /// SIGKILL the broker (nothing of it runs on), then start it again on the
    /// same port with the same data.
    pub async fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.addr, &self.dir);
        self.wait_listening().await;
    }

    /// Stop the broker process where it stands.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// Let it run again.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
