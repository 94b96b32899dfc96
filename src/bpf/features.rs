//! What the running kernel can do for the data path, found at start by
//! probes (loading tiny programs, asking libbpf whether a helper is allowed
//! in a program type, reading the kernel's BTF), never by version numbers:
//! distribution kernels backport features and leave others out.

use serde::Serialize;

/// The kernel facilities the programs depend on beyond connect redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Features {
    /// getsockopt(SO_NETNS_COOKIE) (5.14): the daemon reads an enrolled
    /// netns's cookie directly; without it a BPF probe reads it.
    pub netns_cookie_sockopt: bool,
    /// bpf_get_netns_cookie in sockops and sk_msg programs (5.15); without
    /// it they take the cookie connect4 stored, or read it from the socket.
    pub netns_cookie_in_sockops: bool,
    /// bpf_probe_read_kernel in sockops and sk_msg programs: reading the
    /// peer's psock queue (push-back) and a socket's netns.
    pub probe_read_in_sockops: bool,
    /// bpf_sk_storage_get in sk_msg programs: the waypoint TLV's state.
    pub sk_storage_in_sk_msg: bool,
    /// Atomic fetch-and-or/and on map values (5.12): the two ends of an
    /// accelerated connection agree through them who may redirect.
    pub atomic_fetch: bool,
    /// `sk_psock.msg_tot_len` in the kernel's BTF: the bytes a stalled
    /// reader holds, which bounds an accelerated sender (push-back).
    pub psock_queue_length: bool,
    /// Ring buffers (5.8) and the inet_sock_set_state tracepoint in the
    /// kernel's BTF (tp_btf, 5.5): connection telemetry.
    pub telemetry_tracepoint: bool,
}

impl Features {
    /// Probes the running kernel.
    pub fn probe() -> Features {
        use libbpf_sys::{
            BPF_FUNC_get_netns_cookie, BPF_FUNC_probe_read_kernel, BPF_FUNC_sk_storage_get,
            BPF_PROG_TYPE_SK_MSG, BPF_PROG_TYPE_SOCK_OPS,
        };
        let both = |f| helper(BPF_PROG_TYPE_SOCK_OPS, f) && helper(BPF_PROG_TYPE_SK_MSG, f);
        Features {
            netns_cookie_sockopt: crate::sys::current_netns_cookie().is_ok(),
            netns_cookie_in_sockops: both(BPF_FUNC_get_netns_cookie),
            probe_read_in_sockops: both(BPF_FUNC_probe_read_kernel),
            sk_storage_in_sk_msg: helper(BPF_PROG_TYPE_SK_MSG, BPF_FUNC_sk_storage_get),
            atomic_fetch: atomic_fetch_loads(),
            psock_queue_length: kernel_counts_psock_bytes(),
            telemetry_tracepoint: ringbuf_maps() && state_tracepoint_in_btf(),
        }
    }

    /// Why same-host acceleration cannot run here, if it cannot.
    pub fn acceleration_unavailable(&self) -> Option<&'static str> {
        if !self.atomic_fetch {
            return Some(
                "the kernel's BPF has no atomic fetch-and-or (Linux 5.12), which the two ends \
                 of an accelerated connection need to agree who may redirect",
            );
        }
        if !self.psock_queue_length {
            return Some(
                "the kernel's sk_psock has no msg_tot_len, so a sender to a reader that stopped \
                 reading could not be pushed back and its queue would grow without bound",
            );
        }
        if !self.probe_read_in_sockops {
            return Some("bpf_probe_read_kernel is not allowed in sockops/sk_msg programs");
        }
        if !self.netns_cookie_in_sockops {
            return Some(
                "bpf_get_netns_cookie is not allowed in sockops/sk_msg programs (Linux 5.15), \
                 which keeps two pods' loopback connections apart",
            );
        }
        None
    }

    /// Why waypoints (whose TLV needs the sockops and sk_msg programs)
    /// cannot run here, if they cannot.
    pub fn waypoints_unavailable(&self) -> Option<&'static str> {
        if !self.sk_storage_in_sk_msg {
            return Some("bpf_sk_storage_get is not allowed in sk_msg programs");
        }
        None
    }
}

/// What the data path runs on this kernel, decided once at load: the
/// probes' findings and, for each feature that cannot run, why. Shown in
/// `kmesh ctl dump` under `kernel`.
#[derive(Debug, Clone, Serialize)]
pub struct KernelSupport {
    pub release: String,
    pub features: Features,
    /// Why same-host acceleration is off here (None: it can run).
    pub acceleration: Option<String>,
    /// Why waypoints are off here (None: they can run). Without them a
    /// connection that would go to a waypoint is refused (EPERM), as the
    /// waypoint could not learn its original destination.
    pub waypoints: Option<String>,
    /// Why circuit breakers cannot count here (None: they can): the
    /// sockops program counts a connection from its SYN to its close, and
    /// without it a breaker never refuses a connect.
    pub circuit_breaker: Option<String>,
    /// Why connection telemetry is off here (None: it runs, or was not
    /// asked for: see `telemetry_on`).
    pub telemetry: Option<String>,
    /// Whether the programs report connections (--telemetry on and the
    /// kernel can).
    pub telemetry_on: bool,
    /// How enrolled netns cookies are read: "getsockopt" (SO_NETNS_COOKIE)
    /// or "bpf" (a probe program sees a connect made inside the netns).
    pub netns_cookie: &'static str,
}

impl KernelSupport {
    pub fn new(features: Features) -> KernelSupport {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        KernelSupport {
            release,
            features,
            acceleration: features.acceleration_unavailable().map(str::to_string),
            waypoints: features.waypoints_unavailable().map(str::to_string),
            circuit_breaker: features.waypoints_unavailable().map(str::to_string),
            telemetry: None,
            telemetry_on: false,
            netns_cookie: if features.netns_cookie_sockopt {
                "getsockopt"
            } else {
                "bpf"
            },
        }
    }

    /// The sockops/sk_msg programs could not be loaded: both features off.
    pub fn without_socket_programs(&mut self, reason: String) {
        self.acceleration.get_or_insert_with(|| reason.clone());
        self.circuit_breaker = Some(reason.clone());
        self.waypoints = Some(reason);
    }

    /// Decides whether telemetry runs: asked for, and the kernel has what
    /// its tracepoint program needs.
    pub fn want_telemetry(&mut self, on: bool) {
        self.telemetry = (on && !self.features.telemetry_tracepoint).then(|| {
            "no ring buffers (Linux 5.8) or no inet_sock_set_state tracepoint in the kernel's \
             BTF"
            .into()
        });
        self.telemetry_on = on && self.telemetry.is_none();
    }

    /// The kernel refused or could not attach the telemetry program.
    pub fn without_telemetry(&mut self, reason: String) {
        self.telemetry = Some(reason);
        self.telemetry_on = false;
    }

    /// Whether the sockops and sk_msg programs are loaded.
    pub fn socket_programs(&self) -> bool {
        self.waypoints.is_none()
    }

    /// One line per feature this kernel cannot run.
    pub fn log(&self) {
        if let Some(why) = &self.acceleration {
            tracing::warn!(
                "acceleration is off on this kernel ({}): {why}; connections use plain TCP",
                self.release
            );
        }
        if let Some(why) = &self.telemetry {
            tracing::warn!(
                "connection telemetry is off on this kernel ({}): {why}; istio_tcp_* metrics \
                 and the access log stay empty",
                self.release
            );
        }
        if let Some(why) = &self.waypoints {
            tracing::warn!(
                "waypoints are off on this kernel ({}): {why}; connections to a waypoint are refused",
                self.release
            );
        }
        if let Some(why) = &self.circuit_breaker {
            tracing::warn!(
                "circuit breakers are off on this kernel ({}): {why}; max_connections is not \
                 counted and never refuses a connect (rate limits still apply)",
                self.release
            );
        }
    }
}

/// Whether the running kernel's psock counts the bytes queued on it
/// (`sk_psock.msg_tot_len`), which the sk_msg program's push-back reads
/// (acceleration is off without it).
pub fn kernel_counts_psock_bytes() -> bool {
    use libbpf_rs::btf::{types::Composite, Btf};
    let Ok(btf) = Btf::from_vmlinux() else {
        return false;
    };
    btf.type_by_name::<Composite>("sk_psock")
        .is_some_and(|s| s.iter().any(|m| m.name.is_some_and(|n| n == "msg_tot_len")))
}

fn ringbuf_maps() -> bool {
    // SAFETY: plain probe; a null opts pointer is allowed.
    unsafe {
        libbpf_sys::libbpf_probe_bpf_map_type(libbpf_sys::BPF_MAP_TYPE_RINGBUF, std::ptr::null())
            == 1
    }
}

/// A tp_btf program attaches to a tracepoint through its `btf_trace_*`
/// typedef in the kernel's BTF.
fn state_tracepoint_in_btf() -> bool {
    use libbpf_rs::btf::{types::Typedef, Btf};
    Btf::from_vmlinux().is_ok_and(|btf| {
        btf.type_by_name::<Typedef>("btf_trace_inet_sock_set_state")
            .is_some()
    })
}

/// Whether libbpf finds `func` allowed in programs of `prog_type`.
fn helper(prog_type: libbpf_sys::bpf_prog_type, func: libbpf_sys::bpf_func_id) -> bool {
    // SAFETY: plain probe; a null opts pointer is allowed.
    unsafe { libbpf_sys::libbpf_probe_bpf_helper(prog_type, func, std::ptr::null()) == 1 }
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> libbpf_sys::bpf_insn {
    libbpf_sys::bpf_insn {
        code,
        _bitfield_align_1: [],
        _bitfield_1: libbpf_sys::bpf_insn::new_bitfield_1(dst, src),
        off,
        imm,
    }
}

/// Loads a four-instruction socket filter doing a 32-bit atomic fetch-or on
/// the stack: kernels before 5.12 refuse the instruction ("reserved
/// fields").
fn atomic_fetch_loads() -> bool {
    const MOV64_K: u8 = 0x07 | 0xb0; // BPF_ALU64 | BPF_MOV | BPF_K
    const STX_MEM_W: u8 = 0x03 | 0x60; // BPF_STX | BPF_MEM | BPF_W
    const STX_ATOMIC_W: u8 = 0x03 | 0xc0; // BPF_STX | BPF_ATOMIC | BPF_W
    const EXIT: u8 = 0x05 | 0x90; // BPF_JMP | BPF_EXIT
    const FETCH_OR: i32 = 0x40 | 0x01; // BPF_OR | BPF_FETCH
    let prog = [
        insn(MOV64_K, 1, 0, 0, 0),
        insn(STX_MEM_W, 10, 1, -4, 0),
        insn(MOV64_K, 1, 0, 0, 1),
        insn(STX_ATOMIC_W, 10, 1, -4, FETCH_OR),
        insn(MOV64_K, 0, 0, 0, 0),
        insn(EXIT, 0, 0, 0, 0),
    ];
    // SAFETY: prog outlives the call; a non-negative result is an fd we own.
    let fd = unsafe {
        libbpf_sys::bpf_prog_load(
            libbpf_sys::BPF_PROG_TYPE_SOCKET_FILTER,
            std::ptr::null(),
            c"GPL".as_ptr(),
            prog.as_ptr(),
            prog.len() as _,
            std::ptr::null_mut(),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: fd was just returned to us.
    unsafe { libc::close(fd) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints what the kernel under test has (scripts/kernels.sh runs the
    /// unit tests in its guests too) and checks the probes agree with each
    /// other where one implies another.
    #[test]
    fn probes_run_and_agree() {
        let f = Features::probe();
        println!("kernel features: {f:?}");
        // sk_msg gained bpf_get_netns_cookie (5.15) after atomics (5.12).
        if f.netns_cookie_in_sockops {
            assert!(f.atomic_fetch, "{f:?}");
        }
        if f.acceleration_unavailable().is_none() {
            assert!(f.atomic_fetch && f.psock_queue_length, "{f:?}");
        }
    }
}
