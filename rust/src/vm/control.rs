//! The control socket of a running VM (issue 15): a unix socket on the boot
//! node (the spec's `control` path) where the daemon or `dvmmctl` asks for a
//! snapshot, a vCPU migration or where the vCPUs run, while the VM runs.
//!
//! One request per connection: a JSON object on one line, answered by one
//! JSON line, `{"ok": true, "report": ...}` or `{"error": "..."}`:
//!
//! | request | report |
//! | --- | --- |
//! | `{"op": "snapshot", "dir": D, "leave_running": bool}` | the snapshot's (as in the run result); without `leave_running` the VM stops after it (reason `snapshot`) |
//! | `{"op": "migrate", "vcpu": v, "node": n}` | the move's |
//! | `{"op": "placement"}` | `{"vcpu_node": [...]}`: the node each vCPU runs on |
//!
//! The socket is created with mode 0600 (only its owner may drive the VM) and
//! removed when the VM stops. A malformed request gets an error answer; the
//! VM runs on.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::vcpu::VmStop;

/// How often the server looks at the VM's stop while no one connects.
const POLL: Duration = Duration::from_millis(20);
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line read.
const MAX_REQUEST: u64 = 64 * 1024;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the socket can ask of the VM (the boot node's run loop answers).
pub trait ControlOps: Sync {
    /// Take a snapshot into `dir` (the VM stops after it unless `leave_running`).
    fn snapshot(&self, dir: &str, leave_running: bool) -> Result<Value, String>;
    /// Move vCPU `vcpu` to node `node`.
    fn migrate(&self, vcpu: u32, node: usize) -> Result<Value, String>;
    /// vCPU index -> the node running it.
    fn placement(&self) -> Vec<usize>;
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Snapshot {
        dir: String,
        #[serde(default)]
        leave_running: bool,
    },
    Migrate {
        vcpu: u32,
        node: usize,
    },
    Placement,
}

/// The listening socket; removed from the filesystem when dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Listen on `path` (an old socket file there is replaced), mode 0600.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let err = |source| ControlError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Answer requests until the VM stops (run it on its own thread).
    pub fn serve(&self, ops: &dyn ControlOps, stop: &VmStop) {
        while stop.reason().is_none() {
            match self.listener.accept() {
                Ok((conn, _)) => answer(conn, ops),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection: read the request line, answer it (errors go to the client).
fn answer(conn: UnixStream, ops: &dyn ControlOps) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(READ_TIMEOUT));
    let mut line = String::new();
    let read = conn
        .try_clone()
        .map(|c| BufReader::new(c).take(MAX_REQUEST).read_line(&mut line));
    let reply = match read {
        Ok(Ok(_)) => handle(&line, ops),
        Ok(Err(e)) | Err(e) => json!({ "error": format!("reading the request: {e}") }),
    };
    let mut conn = conn;
    let _ = writeln!(conn, "{reply}");
}

/// The answer to one request line.
pub fn handle(line: &str, ops: &dyn ControlOps) -> Value {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return json!({ "error": format!("malformed control request: {e}") }),
    };
    let r = match req {
        Request::Snapshot { dir, leave_running } => ops.snapshot(&dir, leave_running),
        Request::Migrate { vcpu, node } => ops.migrate(vcpu, node),
        Request::Placement => Ok(json!({ "vcpu_node": ops.placement() })),
    };
    match r {
        Ok(v) => json!({ "ok": true, "report": v }),
        Err(e) => json!({ "error": e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl ControlOps for Fake {
        fn snapshot(&self, dir: &str, leave_running: bool) -> Result<Value, String> {
            if dir.is_empty() {
                return Err("no dir".into());
            }
            Ok(json!({ "dir": dir, "leave_running": leave_running }))
        }
        fn migrate(&self, vcpu: u32, node: usize) -> Result<Value, String> {
            Ok(json!({ "vcpu": vcpu, "to": node }))
        }
        fn placement(&self) -> Vec<usize> {
            vec![0, 1]
        }
    }

    #[test]
    fn requests_are_answered_and_bad_ones_refused() {
        let r = handle(r#"{"op":"placement"}"#, &Fake);
        assert_eq!(r, json!({ "ok": true, "report": { "vcpu_node": [0, 1] } }));
        let r = handle(r#"{"op":"migrate","vcpu":1,"node":0}"#, &Fake);
        assert_eq!(r, json!({ "ok": true, "report": { "vcpu": 1, "to": 0 } }));
        let r = handle(
            r#"{"op":"snapshot","dir":"/x","leave_running":true}"#,
            &Fake,
        );
        assert_eq!(r["report"]["leave_running"], true);
        let r = handle(r#"{"op":"snapshot","dir":""}"#, &Fake);
        assert_eq!(r, json!({ "error": "no dir" }));
        for bad in [
            "",
            "{",
            r#"{"op":"reboot"}"#,
            r#"{"op":"migrate","vcpu":1}"#,
        ] {
            let r = handle(bad, &Fake);
            assert!(
                r["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("malformed control request")),
                "{bad}: {r}"
            );
        }
    }

    #[test]
    fn the_socket_answers_and_goes_away() {
        let dir = std::env::temp_dir().join(format!("dvmm-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm.sock");
        let stop = VmStop::new();
        let sock = ControlSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::thread::scope(|s| {
            s.spawn(|| sock.serve(&Fake, &stop));
            let mut c = UnixStream::connect(&path).unwrap();
            writeln!(c, r#"{{"op":"placement"}}"#).unwrap();
            let mut out = String::new();
            BufReader::new(c).read_line(&mut out).unwrap();
            assert_eq!(out.trim(), r#"{"ok":true,"report":{"vcpu_node":[0,1]}}"#);
            stop.request(crate::vcpu::StopReason::Stopped);
        });
        drop(sock);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
