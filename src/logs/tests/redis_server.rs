//! A throwaway `redis-server` per test: a free loopback port, a temp dir, AOF with
//! `appendfsync always` (so a SIGKILL loses nothing it acknowledged), killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TestResult;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let mut dir = tempfile::tempdir()?;
        let mut last = None;
        // The free port can be taken between probing and binding; try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut server = Self { child: None, port, dir };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => {
                    last = Some(e);
                    dir = server.take_dir()?;
                }
            }
        }
        Err(last.unwrap_or_else(|| "redis-server did not start".into()))
    }

    fn take_dir(mut self) -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
        self.stop();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        Ok(dir)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) -> TestResult {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
            .args(["--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| -> Box<dyn std::error::Error> {
                if e.kind() == std::io::ErrorKind::NotFound {
                    "redis-server is not installed: the Redis log store tests need it \
                     (apt-get install -y redis-server)"
                        .into()
                } else {
                    format!("cannot start redis-server: {e}").into()
                }
            })?;
        self.child = Some(child);
        wait_ready(self.port, self.dir.path(), self.child.as_mut())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.stop();
    }

    /// Starts again on the same port and data dir (the AOF is reloaded).
    pub fn restart(&mut self) -> TestResult {
        self.stop();
        self.spawn()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_ready(port: u16, dir: &Path, child: Option<&mut Child>) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut child = child;
    while Instant::now() < deadline {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            return Err(format!("redis-server on port {port} exited: {status}").into());
        }
        if ping(port).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("redis-server on port {port} (dir {}) did not answer PING", dir.display()).into())
}

fn ping(port: u16) -> TestResult {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf)?;
    if &buf == b"+PONG\r\n" {
        Ok(())
    } else {
        // Still loading the AOF (`-LOADING`) or similar.
        Err("not ready".into())
    }
}
