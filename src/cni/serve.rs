//! The daemon's answers to the plugin's admin-socket requests. The admin
//! task hands each request to the daemon's loop (the one place that
//! changes sources and applies); ADD is answered only after the apply,
//! once the netns is seen in the manage map.

use std::sync::Mutex;

use libbpf_rs::{MapCore, MapFlags};
use tokio::sync::{mpsc, oneshot};

use super::{source::CniSource, PodRequest};
use crate::{bpf::MapId, model::EntryKey, writer::MapWriter, xds::client::Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
    Check,
}

impl Op {
    pub fn parse(cmd: &str) -> Option<Op> {
        match cmd {
            super::ADD => Some(Op::Add),
            super::DEL => Some(Op::Del),
            super::CHECK => Some(Op::Check),
            _ => None,
        }
    }

    /// For the apply's log line.
    pub fn why(self) -> &'static str {
        match self {
            Op::Add => "CNI ADD",
            Op::Del => "CNI DEL",
            Op::Check => "CNI CHECK",
        }
    }
}

pub type Reply = oneshot::Sender<Result<String, String>>;

pub struct Call {
    pub op: Op,
    pub req: PodRequest,
    pub reply: Reply,
}

pub type Calls = mpsc::Sender<Call>;

/// A request whose answer waits for the apply.
pub struct Pending {
    call: Call,
    cookie: u64,
}

/// A refused ADD, answered once the apply taking it out is done.
pub struct Undo {
    reply: Reply,
    message: String,
}

impl Undo {
    pub fn send(self) {
        let _ = self.reply.send(Err(self.message));
    }
}

fn in_maps(writer: &Mutex<MapWriter>, cookie: u64) -> bool {
    let w = writer.lock().unwrap_or_else(|e| e.into_inner());
    matches!(
        w.datapath()
            .map(MapId::Manage)
            .lookup(&cookie.to_ne_bytes(), MapFlags::ANY),
        Ok(Some(_))
    )
}

/// Changes the source for `call`; Some if an apply must follow before the
/// answer, None when it was answered already.
pub fn begin(cni: &Mutex<CniSource>, writer: &Mutex<MapWriter>, call: Call) -> Option<Pending> {
    let mut src = cni.lock().unwrap_or_else(|e| e.into_inner());
    let id = call.req.container_id.clone();
    let answer = match call.op {
        Op::Add => match src.add(&call.req) {
            Ok(cookie) => return Some(Pending { call, cookie }),
            Err(e) => Err(e.to_string()),
        },
        Op::Del => match src.remove(&id) {
            Ok(Some(r)) => {
                tracing::info!("CNI: pod {} ({id}) un-enrolled", r.pod);
                return Some(Pending { call, cookie: 0 });
            }
            Ok(None) => Ok(format!("container {id} was not enrolled")),
            Err(e) => {
                // Out of the layer already; only the record lingers, and
                // the restart's reconcile drops it once the netns is gone.
                tracing::error!("CNI DEL {id}: {e}");
                return Some(Pending { call, cookie: 0 });
            }
        },
        Op::Check => match src.get(&id) {
            None => Err(format!("container {id} is not enrolled")),
            Some(r) => {
                let now = crate::config::resolve_netns(std::path::Path::new(&call.req.netns));
                match now {
                    Ok((cookie, _)) if cookie != r.cookie => Err(format!(
                        "container {id}: {} is not the netns enrolled at ADD",
                        call.req.netns
                    )),
                    Err(e) => Err(format!("container {id}: netns {}: {e}", call.req.netns)),
                    Ok(_) if !in_maps(writer, r.cookie) => Err(format!(
                        "container {id}: netns cookie {} is not in the manage map",
                        r.cookie
                    )),
                    Ok(_) => Ok(format!("container {id} enrolled")),
                }
            }
        },
    };
    let _ = call.reply.send(answer);
    None
}

impl Pending {
    /// Answers after the apply. A netns the apply did not write is taken
    /// out of the source again: the caller applies once more, then sends
    /// the returned refusal.
    pub fn finish(
        self,
        cni: &Mutex<CniSource>,
        writer: &Mutex<MapWriter>,
        verdict: &Verdict,
    ) -> Option<Undo> {
        let Pending { call, cookie } = self;
        if call.op != Op::Add {
            let _ = call.reply.send(Ok("done".into()));
            return None;
        }
        if in_maps(writer, cookie) {
            tracing::info!(
                "CNI: pod {} ({}) enrolled, netns {} (cookie {cookie})",
                call.req.pod,
                call.req.container_id,
                call.req.netns
            );
            let _ = call.reply.send(Ok(format!("{{\"cookie\":{cookie}}}")));
            return None;
        }
        let mut why: Vec<String> = verdict
            .rejected
            .iter()
            .filter(|r| matches!(&r.entry, EntryKey::Enrollment(s) if s.contains(&call.req.netns)))
            .map(|r| r.reason.clone())
            .collect();
        why.extend(verdict.failed.clone());
        if why.is_empty() {
            why.push("the apply did not write it".into());
        }
        let _ = cni
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&call.req.container_id);
        Some(Undo {
            reply: call.reply,
            message: format!("netns {} not enrolled: {}", call.req.netns, why.join("; ")),
        })
    }
}
