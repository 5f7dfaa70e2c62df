//! Compute threads yield the CPU to the node's control work. On a busy machine a forward
//! pass can keep every core for tens of milliseconds; Raft heartbeats, health gossip and
//! request routing run on the async runtime and must not wait behind it, or the node looks
//! dead to its peers. So threads that run forward passes lower their own scheduling priority
//! (Linux `nice` is per thread), and the runtime's threads keep the default.

/// Lowers the calling thread's priority to `nice` (0 = unchanged, 19 = lowest). Returns the
/// OS error when the change is refused; callers log it and go on at the default priority.
pub fn lower_current_thread_priority(nice: i32) -> std::io::Result<()> {
    if nice <= 0 {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
        let result = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice.min(19))
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
