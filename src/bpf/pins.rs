//! Which pins under the bpffs directory are still this daemon's. Daemons
//! overlap in a rolling update: the new one pins its own maps and links at
//! the same paths while the old one still runs, and the old one's shutdown
//! must then leave those alone. A pin is ours if the object it holds has
//! the kernel id of the object we hold.

use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// Kernel id of the BPF object (map, link or program) behind `fd`. The
/// info structs of all three start with `__u32 type; __u32 id;`, and the
/// kernel copies only as much as the caller's length allows.
pub(super) fn object_id(fd: BorrowedFd<'_>) -> Option<u32> {
    let mut head = [0u32; 2];
    let mut len = std::mem::size_of_val(&head) as u32;
    // SAFETY: head/len describe a valid, writable 8-byte buffer.
    let rc = unsafe {
        libbpf_sys::bpf_obj_get_info_by_fd(fd.as_raw_fd(), head.as_mut_ptr().cast(), &mut len)
    };
    (rc == 0 && len >= 8).then_some(head[1])
}

/// Kernel id of the object pinned at `path`, None if nothing is pinned
/// there (or it cannot be opened).
pub(super) fn pinned_id(path: &Path) -> Option<u32> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: c is a valid NUL-terminated path.
    let fd = unsafe { libbpf_sys::bpf_obj_get(c.as_ptr()) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd returned to us, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    object_id(std::os::fd::AsFd::as_fd(&fd))
}

/// Whether the pin at `path` holds the object behind `fd`.
pub(super) fn is_ours(path: &Path, fd: BorrowedFd<'_>) -> bool {
    match (pinned_id(path), object_id(fd)) {
        (Some(pinned), Some(held)) => pinned == held,
        _ => false,
    }
}

/// Whether something other than the object behind `fd` is pinned at
/// `path`: another daemon has taken the path over.
pub(super) fn is_taken(path: &Path, fd: BorrowedFd<'_>) -> bool {
    pinned_id(path).is_some() && !is_ours(path, fd)
}

/// Removes the pin at `path` if it holds the object behind `fd`; says
/// whether it was left because another object is pinned there.
pub(super) fn remove_if_ours(path: &Path, fd: BorrowedFd<'_>) -> bool {
    if is_ours(path, fd) {
        let _ = std::fs::remove_file(path);
        false
    } else {
        path.exists()
    }
}
