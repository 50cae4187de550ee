//! The wasip1 functions wrapped around wasmtime-wasi's own: sleeps, the descriptor
//! cap and the [`Disk`] budget.

use std::sync::atomic::Ordering;
use std::time::Duration;

use wasmtime::{AsContextMut, Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::types as p1t;
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as p1, WasiSnapshotPreview1 as _};
use wiggle::{GuestMemory, GuestPtr};

use super::disk::Disk;
use super::{EPOCH_TICK, P1State};

/// The guest's memory and its state, as wasmtime-wasi's own glue hands them to a
/// wasip1 function.
fn p1_parts<'a>(
    caller: &'a mut Caller<'_, P1State>,
) -> wasmtime::Result<(GuestMemory<'a>, &'a mut P1State)> {
    let fuel = caller.as_context_mut().hostcall_fuel();
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        // Shared memories need wasm threads, which this engine does not enable.
        wasmtime::bail!("missing required memory export");
    };
    let (bytes, state) = memory.data_and_store_mut(caller);
    state.wasi.set_hostcall_fuel(fuel);
    Ok((GuestMemory::Unshared(bytes), state))
}

fn errno(e: p1t::Errno) -> i32 {
    i32::from(u16::from(e))
}

/// Replaces a few of wasmtime-wasi's wasip1 functions with wrappers around them:
/// - `poll_oneoff` on one relative clock (every `sleep`, and `select`/`poll` with
///   no descriptors) would `std::thread::sleep` under `allow_blocking_current_thread`,
///   holding a runtime worker and deaf to timeouts and cancellation: a sleep of a
///   tick or longer becomes a timer of the runtime here;
/// - `path_open`, `fd_close` and `fd_renumber` count the guest's descriptors, and
///   an open past its limit is refused with EMFILE;
/// - `fd_write`, `fd_pwrite` and `fd_filestat_set_size` keep the guest's files
///   within its [`Disk`] budget (ENOSPC past it); `path_open` (`O_TRUNC`),
///   `path_unlink_file`, `path_rename` and the closes give bytes back.
///   (`fd_allocate` is refused by wasmtime-wasi itself: ENOTSUP.)
pub(super) fn wrap_p1(linker: &mut Linker<P1State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    wrap_sleep(linker)?;
    wrap_opens(linker)?;
    wrap_writes(linker)?;
    wrap_unlinks(linker)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `poll_oneoff`: a lone relative sleep of a tick or longer on a timer of the runtime.
fn wrap_sleep(linker: &mut Linker<P1State>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        |mut caller: Caller<'_, P1State>, (subs, events, n, nevents): (i32, i32, i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let Some((userdata, nap)) = lone_relative_sleep(&mem, subs, n) else {
                    return p1::poll_oneoff(&mut state.wasi, &mut mem, subs, events, n, nevents)
                        .await;
                };
                if nap < EPOCH_TICK {
                    // Shorter than a tick, like a stretch of computation: slept on
                    // this thread, as precisely as the kernel can.
                    std::thread::sleep(nap);
                } else {
                    tokio::time::sleep(nap).await;
                }
                let (mut mem, _) = p1_parts(&mut caller)?;
                let event = p1t::Event {
                    userdata,
                    error: p1t::Errno::Success,
                    type_: p1t::Eventtype::Clock,
                    fd_readwrite: p1t::EventFdReadwrite {
                        flags: p1t::Eventrwflags::empty(),
                        nbytes: 1,
                    },
                };
                let written = mem
                    .write(GuestPtr::<p1t::Event>::new(events as u32), event)
                    .and_then(|()| mem.write(GuestPtr::<u32>::new(nevents as u32), 1));
                Ok(match written {
                    Ok(()) => errno(p1t::Errno::Success),
                    Err(_) => errno(p1t::Errno::Fault),
                })
            })
        },
    )?;
    Ok(())
}

/// `path_open`, `fd_close` and `fd_renumber`: the descriptor count, and the
/// files the disk budget tracks.
fn wrap_opens(linker: &mut Linker<P1State>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_open",
        |mut caller: Caller<'_, P1State>,
         (fd, lookup, path, path_len, oflags, base, inheriting, fdflags, opened): (
            i32,
            i32,
            i32,
            i32,
            i32,
            i64,
            i64,
            i32,
            i32,
        )| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                if state.open >= state.descriptor_limit {
                    if !state.limits.hits.descriptors.swap(true, Ordering::Relaxed) {
                        state.log.note(&format!(
                            "descriptor limit of {} open files reached: opens fail with EMFILE until one is closed",
                            state.descriptor_limit
                        ));
                    }
                    return Ok(errno(p1t::Errno::Mfile));
                }
                // A truncating open gives back what the file held.
                let truncated = if p1t::Oflags::from_bits_truncate(oflags as u16)
                    .contains(p1t::Oflags::TRUNC)
                {
                    let follow = p1t::Lookupflags::from_bits_truncate(lookup as u32)
                        .contains(p1t::Lookupflags::SYMLINK_FOLLOW);
                    path_stat(&mut state.wasi, &mut mem, fd, (path, path_len), follow).await
                } else {
                    None
                };
                let r = p1::path_open(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    lookup,
                    path,
                    path_len,
                    oflags,
                    base,
                    inheriting,
                    fdflags,
                    opened,
                )
                .await?;
                if r == errno(p1t::Errno::Success) {
                    state.open += 1;
                    if let Some(t) = truncated {
                        state.disk.credit(t.size);
                    }
                    let new_fd = mem
                        .read(GuestPtr::<u32>::new(opened as u32))
                        .ok()
                        .map(|f| f as i32);
                    if let Some(new_fd) = new_fd
                        && let Some(st) = file_stat(&mut state.wasi, &mut mem, new_fd).await
                    {
                        state.disk.opened(new_fd, st.ino, st.size);
                    }
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_close",
        |mut caller: Caller<'_, P1State>, (fd,): (i32,)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let held = held_stat(state, &mut mem, fd).await;
                let r = p1::fd_close(&mut state.wasi, &mut mem, fd).await?;
                if r == errno(p1t::Errno::Success) {
                    state.open = state.open.saturating_sub(1);
                    closed(&mut state.disk, fd, held);
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_renumber",
        |mut caller: Caller<'_, P1State>, (from, to): (i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let held = held_stat(state, &mut mem, to).await;
                let r = p1::fd_renumber(&mut state.wasi, &mut mem, from, to).await?;
                // `to` was closed and `from` took its number: one fewer.
                if r == errno(p1t::Errno::Success) && from != to {
                    state.open = state.open.saturating_sub(1);
                    closed(&mut state.disk, to, held);
                    if let Some((ino, size)) = state.disk.size_of(from) {
                        state.disk.closed(from);
                        state.disk.opened(to, ino, size);
                    }
                }
                Ok(r)
            })
        },
    )?;
    Ok(())
}

/// `fd_write`, `fd_pwrite` and `fd_filestat_set_size`: within the disk budget.
fn wrap_writes(linker: &mut Linker<P1State>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut caller: Caller<'_, P1State>, (fd, iovs, n, nwritten): (i32, i32, i32, i32)| {
            Box::new(
                async move { budgeted_write(&mut caller, fd, (iovs, n), None, nwritten).await },
            )
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_pwrite",
        |mut caller: Caller<'_, P1State>,
         (fd, iovs, n, offset, nwritten): (i32, i32, i32, i64, i32)| {
            Box::new(async move {
                budgeted_write(&mut caller, fd, (iovs, n), Some(offset), nwritten).await
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "fd_filestat_set_size",
        |mut caller: Caller<'_, P1State>, (fd, size): (i32, i64)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                // A negative size is the real function's EINVAL.
                let before = match size {
                    0.. => file_stat(&mut state.wasi, &mut mem, fd).await,
                    _ => None,
                };
                let size_now = before.as_ref().map(|b| b.size);
                if let Some(now) = size_now
                    && !state.disk.admit((size as u64).saturating_sub(now))
                {
                    return Ok(errno(p1t::Errno::Nospc));
                }
                let r = p1::fd_filestat_set_size(&mut state.wasi, &mut mem, fd, size).await?;
                if r == errno(p1t::Errno::Success)
                    && let Some(now) = size_now
                {
                    let size = size as u64;
                    state.disk.set_size(now, size);
                    state.disk.resized(fd, size);
                }
                Ok(r)
            })
        },
    )?;
    Ok(())
}

/// `path_unlink_file` and `path_rename`: a file's last link gives its bytes back.
fn wrap_unlinks(linker: &mut Linker<P1State>) -> wasmtime::Result<()> {
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_unlink_file",
        |mut caller: Caller<'_, P1State>, (fd, path, len): (i32, i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let gone = path_stat(&mut state.wasi, &mut mem, fd, (path, len), false).await;
                let r = p1::path_unlink_file(&mut state.wasi, &mut mem, fd, path, len).await?;
                if r == errno(p1t::Errno::Success) {
                    unlinked(&mut state.disk, gone);
                }
                Ok(r)
            })
        },
    )?;
    linker.func_wrap_async(
        "wasi_snapshot_preview1",
        "path_rename",
        |mut caller: Caller<'_, P1State>,
         (fd, old, old_len, new_fd, new, new_len): (i32, i32, i32, i32, i32, i32)| {
            Box::new(async move {
                let (mut mem, state) = p1_parts(&mut caller)?;
                let replaced =
                    path_stat(&mut state.wasi, &mut mem, new_fd, (new, new_len), false).await;
                let moved = path_stat(&mut state.wasi, &mut mem, fd, (old, old_len), false).await;
                let r = p1::path_rename(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    old,
                    old_len,
                    new_fd,
                    new,
                    new_len,
                )
                .await?;
                // A rename onto another link of the same file removes nothing.
                if r == errno(p1t::Errno::Success)
                    && replaced.as_ref().map(|s| s.ino) != moved.as_ref().map(|s| s.ino)
                {
                    unlinked(&mut state.disk, replaced);
                }
                Ok(r)
            })
        },
    )?;
    Ok(())
}

/// The stat of `fd` if it is a regular file: what the disk budget counts (stdio,
/// directories and anything else are not files that hold bytes).
async fn file_stat(
    wasi: &mut WasiP1Ctx,
    mem: &mut GuestMemory<'_>,
    fd: i32,
) -> Option<p1t::Filestat> {
    let st = wasi
        .fd_filestat_get(mem, p1t::Fd::from(fd as u32))
        .await
        .ok()?;
    (st.filetype == p1t::Filetype::RegularFile).then_some(st)
}

/// The stat of the regular file at the guest's `path` under directory `dir`.
async fn path_stat(
    wasi: &mut WasiP1Ctx,
    mem: &mut GuestMemory<'_>,
    dir: i32,
    (path, len): (i32, i32),
    follow: bool,
) -> Option<p1t::Filestat> {
    let flags = if follow {
        p1t::Lookupflags::SYMLINK_FOLLOW
    } else {
        p1t::Lookupflags::empty()
    };
    let st = wasi
        .path_filestat_get(
            mem,
            p1t::Fd::from(dir as u32),
            flags,
            GuestPtr::<str>::new((path as u32, len as u32)),
        )
        .await
        .ok()?;
    (st.filetype == p1t::Filetype::RegularFile).then_some(st)
}

/// The stat of `fd` if the disk budget tracks it as an open file (before it is
/// closed: afterwards its size can no longer be asked).
async fn held_stat(
    state: &mut P1State,
    mem: &mut GuestMemory<'_>,
    fd: i32,
) -> Option<p1t::Filestat> {
    if !state.disk.open.contains_key(&fd) {
        return None;
    }
    file_stat(&mut state.wasi, mem, fd).await
}

/// Descriptor `fd` (stat `held` before) was closed: the last descriptor of a file
/// without links frees its bytes.
fn closed(disk: &mut Disk, fd: i32, held: Option<p1t::Filestat>) {
    if disk.closed(fd)
        && let Some(st) = held
        && st.nlink == 0
    {
        disk.credit(st.size);
    }
}

/// The file (stat before) lost a link: its last one frees its bytes, unless the
/// guest holds it open (then its last close does).
fn unlinked(disk: &mut Disk, gone: Option<p1t::Filestat>) {
    if let Some(st) = gone
        && st.nlink == 1
        && !disk.is_open(st.ino)
    {
        disk.credit(st.size);
    }
}

/// The length of the first non-empty buffer of an iovec array: what one
/// `fd_write` writes (wasmtime-wasi writes only that one). 0 if the guest's
/// memory is wrong, which the real function reports.
fn first_write_len(mem: &GuestMemory<'_>, (iovs, n): (i32, i32)) -> u64 {
    let array = GuestPtr::<[p1t::Ciovec]>::new((iovs as u32, n as u32));
    for at in array.iter() {
        let Ok(iov) = at.and_then(|at| mem.read(at)) else {
            return 0;
        };
        if iov.buf_len > 0 {
            return u64::from(iov.buf_len);
        }
    }
    0
}

/// `fd_write`, or `fd_pwrite` at `at`, within the disk budget: a write to a regular
/// file that would grow the guest's files past the cap fails with ENOSPC before
/// anything is written; what a write grew its file by is charged after it.
async fn budgeted_write(
    caller: &mut Caller<'_, P1State>,
    fd: i32,
    iovs: (i32, i32),
    at: Option<i64>,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    let (mut mem, state) = p1_parts(caller)?;
    // The size before: kept for the files the guest opened; asked otherwise (its
    // stdio, which are no files and answer without a syscall).
    let before = match state.disk.size_of(fd) {
        Some((_, size)) => Some(size),
        None => file_stat(&mut state.wasi, &mut mem, fd)
            .await
            .map(|st| st.size),
    };
    if let Some(size) = before {
        let len = first_write_len(&mem, iovs);
        let wfd = p1t::Fd::from(fd as u32);
        // Where the write starts matters as much as its length: one byte at 1 TiB
        // grows the file by 1 TiB (a hole whose blocks later writes fill without
        // growing it). The position is the descriptor's, kept in memory.
        let start = match at {
            Some(offset) => offset as u64,
            None => state.wasi.fd_tell(&mut mem, wfd).unwrap_or(0),
        };
        // The most the write can grow the file: by its end past the size, or by its
        // length on an append descriptor (which writes at the end wherever it is).
        let worst = start.saturating_add(len).saturating_sub(size).max(len);
        if worst > state.disk.room() {
            let append = state
                .wasi
                .fd_fdstat_get(&mut mem, wfd)
                .await
                .is_ok_and(|s| s.fs_flags.contains(p1t::Fdflags::APPEND));
            let growth = if append {
                len
            } else {
                start.saturating_add(len).saturating_sub(size)
            };
            if !state.disk.admit(growth) {
                return Ok(errno(p1t::Errno::Nospc));
            }
        }
    }
    let (iovs, n) = iovs;
    let r = match at {
        None => p1::fd_write(&mut state.wasi, &mut mem, fd, iovs, n, nwritten).await?,
        Some(offset) => {
            p1::fd_pwrite(&mut state.wasi, &mut mem, fd, iovs, n, offset, nwritten).await?
        }
    };
    if r != errno(p1t::Errno::Success) {
        return Ok(r);
    }
    let Some(size) = before else { return Ok(r) };
    let size_after = match at {
        // After an `fd_write` the position is where it ended, or for an append
        // descriptor the file's new size (wasmtime-wasi asks it): no second stat.
        None => state
            .wasi
            .fd_tell(&mut mem, p1t::Fd::from(fd as u32))
            .ok()
            .map(|end| end.max(size)),
        // `fd_pwrite` leaves the position alone, and appends anyway on an append
        // descriptor: ask the file.
        Some(_) => file_stat(&mut state.wasi, &mut mem, fd)
            .await
            .map(|a| a.size),
    };
    let size_after = size_after.unwrap_or(size);
    state.disk.charge(size_after.saturating_sub(size));
    state.disk.resized(fd, size_after);
    Ok(r)
}

/// A `poll_oneoff` that only sleeps: one subscription, to a relative monotonic or
/// realtime clock. Its userdata and duration; `None` for anything else (or memory
/// the guest got wrong, which the real function reports).
fn lone_relative_sleep(mem: &GuestMemory<'_>, subs: i32, n: i32) -> Option<(u64, Duration)> {
    if n != 1 {
        return None;
    }
    let sub = mem
        .read(GuestPtr::<p1t::Subscription>::new(subs as u32))
        .ok()?;
    match sub.u {
        p1t::SubscriptionU::Clock(c)
            if !c
                .flags
                .contains(p1t::Subclockflags::SUBSCRIPTION_CLOCK_ABSTIME)
                && matches!(c.id, p1t::Clockid::Monotonic | p1t::Clockid::Realtime) =>
        {
            Some((sub.userdata, Duration::from_nanos(c.timeout)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_relative_clock_is_a_sleep() {
        let mut bytes = vec![0u8; 256];
        let mut mem = GuestMemory::Unshared(&mut bytes);
        let sub = |flags, id| p1t::Subscription {
            userdata: 7,
            u: p1t::SubscriptionU::Clock(p1t::SubscriptionClock {
                id,
                timeout: 5_000_000_000,
                precision: 0,
                flags,
            }),
        };
        let at = GuestPtr::<p1t::Subscription>::new(0);
        mem.write(
            at,
            sub(p1t::Subclockflags::empty(), p1t::Clockid::Monotonic),
        )
        .unwrap();
        assert_eq!(
            lone_relative_sleep(&mem, 0, 1),
            Some((7, Duration::from_secs(5)))
        );
        // Two subscriptions, a deadline, a CPU clock, a pointer out of memory: the
        // real function's business.
        assert_eq!(lone_relative_sleep(&mem, 0, 2), None);
        assert_eq!(lone_relative_sleep(&mem, 1 << 20, 1), None);
        mem.write(
            at,
            sub(
                p1t::Subclockflags::SUBSCRIPTION_CLOCK_ABSTIME,
                p1t::Clockid::Monotonic,
            ),
        )
        .unwrap();
        assert_eq!(lone_relative_sleep(&mem, 0, 1), None);
        mem.write(
            at,
            sub(p1t::Subclockflags::empty(), p1t::Clockid::ProcessCputimeId),
        )
        .unwrap();
        assert_eq!(lone_relative_sleep(&mem, 0, 1), None);
    }
}
