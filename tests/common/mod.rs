//! Helpers shared by the daemon tests: start the real binary, talk HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The `kvdex` binary with no `KVDEX_*` variable inherited from the caller's environment.
pub fn kvdex() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvdex"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KVDEX_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("KVDEX_LOG", "warn");
    cmd
}

/// A running `kvdex serve` on a free loopback port; SIGTERMed and reaped on drop.
pub struct Daemon {
    /// The child process.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Daemon {
    /// Starts `kvdex serve --listen 127.0.0.1:0` with `env` and waits for its address.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut cmd = kvdex();
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        Self::start_with(&mut cmd, env)
    }

    /// Starts `cmd` (which runs `kvdex serve`, perhaps through a wrapper) with `env` and no
    /// other `KVDEX_*` variable, and waits for its address.
    pub fn start_with(cmd: &mut Command, env: &[(&str, &str)]) -> Self {
        for (k, _) in std::env::vars() {
            if k.starts_with("KVDEX_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("KVDEX_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn kvdex serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("kvdex listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => Self { child, base },
            Err(_) => {
                let _ = child.kill();
                panic!("kvdex serve did not print its address: {:?}", child.wait());
            }
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().expect("wait for kvdex");
        std::mem::forget(self);
        status
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped (we still own Child).
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// Small blocking HTTP helpers over ureq.
pub mod http {
    use super::*;

    /// Runs `req`, returning (status, body text) for success and error statuses alike.
    pub fn send(req: ureq::Request, body: Option<&serde_json::Value>) -> (u16, String) {
        let r = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("transport error: {e}"),
        };
        (resp.status(), resp.into_string().unwrap_or_default())
    }

    /// GET `base + path`.
    pub fn get(base: &str, path: &str) -> (u16, String) {
        send(ureq::get(&format!("{base}{path}")), None)
    }

    /// GET `base + path` as JSON.
    pub fn get_json(base: &str, path: &str) -> (u16, serde_json::Value) {
        let (st, body) = get(base, path);
        (
            st,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    /// A raw HTTP/1.0 GET over a Unix socket; the whole reply.
    pub fn unix_get(sock: &std::path::Path, path: &str) -> String {
        let mut s =
            std::os::unix::net::UnixStream::connect(sock).expect("connect to the Unix socket");
        write!(s, "GET {path} HTTP/1.0\r\nHost: kvdex\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}
