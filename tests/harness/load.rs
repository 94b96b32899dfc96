//! kmesh-load from tests and benches: its echo server, and `hold` (many
//! concurrent connections kept open, driven over stdin).

use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
};

use serde_json::Value;

use super::{Env, Pod};

pub const LOAD: &str = env!("CARGO_BIN_EXE_kmesh-load");

impl Env {
    /// kmesh-load in `pod`, inside the attached cgroup, so its sockets meet
    /// the data path; `global` goes before the subcommand (e.g. --cpu).
    pub fn load_cmd(&self, pod: &Pod, global: &[&str]) -> Command {
        let mut c = Command::new(LOAD);
        c.args(["--netns", &pod.path()]);
        c.args(["--cgroup", self.cgroup.to_str().unwrap()]);
        c.args(global);
        c
    }

    /// The kmesh-load echo server in `pod`, in the attached cgroup (both
    /// ends of a connection must be for acceleration); returns its pid.
    pub fn load_serve(&mut self, pod: &Pod, listen: &[String], global: &[&str]) -> u32 {
        let mut cmd = self.load_cmd(pod, global);
        cmd.arg("serve");
        for l in listen {
            cmd.args(["--listen", l]);
        }
        self.spawn_listening(cmd, &format!("kmesh-load serve {listen:?}"))
    }

    /// `kmesh-load hold` from `pod` (attached cgroup): `conns` connections
    /// spread over `addrs`, plus `extra` hold options. Returns once all are
    /// open (or failed); see `Hold::open`.
    pub fn load_hold(&self, pod: &Pod, addrs: &[&str], conns: usize, extra: &[&str]) -> Hold {
        let mut cmd = self.load_cmd(pod, &[]);
        cmd.arg("hold").args(addrs);
        cmd.args(["--conns", &conns.to_string()]).args(extra);
        Hold::start(cmd)
    }
}

/// A running `kmesh-load hold`. Dropping it kills the process, which
/// closes every connection.
pub struct Hold {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The `open` line: conns, opened, failed, errors, seconds, per_s.
    pub open: Value,
}

impl Hold {
    /// Spawns `cmd` (a `kmesh-load … hold …` command) and waits for its
    /// `open` line.
    pub fn start(cmd: Command) -> Hold {
        let mut h = Hold::spawn(cmd);
        h.wait_open();
        h
    }

    /// Spawns without waiting, so several can open at once; `wait_open`
    /// before anything else.
    pub fn spawn(mut cmd: Command) -> Hold {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn kmesh-load hold");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Hold {
            child,
            stdin,
            stdout,
            open: Value::Null,
        }
    }

    pub fn wait_open(&mut self) -> &Value {
        self.open = self.next().unwrap_or_else(|| {
            panic!("kmesh-load hold exited before opening: {:?}", self.status())
        });
        assert_eq!(self.open["event"], "open", "{}", self.open);
        &self.open
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line).ok()? == 0 {
            return None;
        }
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("kmesh-load hold line {line:?}: {e}")),
        )
    }

    /// Sends a command (`check`, `rr K ROUNDS`) and returns its JSON line.
    pub fn command(&mut self, cmd: &str) -> Value {
        self.send(cmd);
        self.recv(cmd)
    }

    /// Sends a command without waiting for its answer (see `recv`).
    pub fn send(&mut self, cmd: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("hold still running");
        writeln!(stdin, "{cmd}").expect("write to kmesh-load hold");
    }

    /// The answer to the command `cmd` sent before.
    pub fn recv(&mut self, cmd: &str) -> Value {
        self.next()
            .unwrap_or_else(|| panic!("kmesh-load hold exited on {cmd:?}"))
    }

    /// Closes stdin, which ends the hold, without waiting: lets several
    /// close at once before `close` collects each.
    pub fn end_input(&mut self) {
        drop(self.stdin.take());
    }

    /// Ends the hold (closes stdin): the remaining lines and exit status.
    pub fn close(mut self) -> (Vec<Value>, ExitStatus) {
        drop(self.stdin.take());
        let mut lines = Vec::new();
        while let Some(v) = self.next() {
            lines.push(v);
        }
        (lines, self.child.wait().expect("wait for kmesh-load hold"))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
