//! The build's fixed view of files and clocks: what the guest learns of file
//! identities and time during the imports ends up in the snapshot, so the build
//! presents the same values wherever and however the runtime was unpacked.

use super::*;

pub(super) struct BuildState {
    pub(super) wasi: WasiP1Ctx,
    /// The build's inode numbers: the host's (a hash of device and inode), numbered
    /// in the order the guest first sees them.
    pub(super) inodes: std::collections::HashMap<u64, u64>,
}

pub(super) const P1: &str = "wasi_snapshot_preview1";

/// Shadows the three WASI calls that tell the guest a file's identity and times
/// (`fd_filestat_get`, `path_filestat_get`, `fd_readdir`) with ones that present a
/// fixed view: inode numbers counted from 1 in the order the build meets them,
/// one link, every timestamp the build's epoch. What the guest learns there ends
/// up in the snapshot (in `os.stat` results and the heap they leave behind), and
/// the host's values depend on where and how the runtime was unpacked: a copy of
/// the same files at another path gave 751 different bytes.
pub(super) fn fixed_file_view(linker: &mut Linker<BuildState>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p1::wasi_snapshot_preview1 as p1;
    use wasmtime_wasi::runtime::in_tokio;
    linker.allow_shadowing(true);
    linker.func_wrap(
        P1,
        "fd_filestat_get",
        |mut c: wasmtime::Caller<'_, BuildState>, fd: i32, buf: i32| {
            let errno = {
                let (mut mem, state) = p1_parts(&mut c)?;
                in_tokio(p1::fd_filestat_get(&mut state.wasi, &mut mem, fd, buf))?
            };
            if errno == 0 {
                fix_filestat(&mut c, buf)?;
            }
            Ok(errno)
        },
    )?;
    linker.func_wrap(
        P1,
        "path_filestat_get",
        |mut c: wasmtime::Caller<'_, BuildState>,
         fd: i32,
         flags: i32,
         path: i32,
         len: i32,
         buf: i32| {
            let errno = {
                let (mut mem, state) = p1_parts(&mut c)?;
                in_tokio(p1::path_filestat_get(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    flags,
                    path,
                    len,
                    buf,
                ))?
            };
            if errno == 0 {
                fix_filestat(&mut c, buf)?;
            }
            Ok(errno)
        },
    )?;
    linker.func_wrap(
        P1,
        "fd_readdir",
        |mut c: wasmtime::Caller<'_, BuildState>,
         fd: i32,
         buf: i32,
         len: i32,
         cookie: i64,
         used: i32| {
            let errno = {
                let (mut mem, state) = p1_parts(&mut c)?;
                in_tokio(p1::fd_readdir(
                    &mut state.wasi,
                    &mut mem,
                    fd,
                    buf,
                    len,
                    cookie,
                    used,
                ))?
            };
            if errno == 0 {
                fix_dirents(&mut c, buf, used)?;
            }
            Ok(errno)
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// What wasmtime-wasi's wasip1 functions take: the guest's memory and the context.
pub(super) fn p1_parts<'a>(
    c: &'a mut wasmtime::Caller<'_, BuildState>,
) -> wasmtime::Result<(wiggle::GuestMemory<'a>, &'a mut BuildState)> {
    use wasmtime::AsContextMut;
    use wasmtime_wasi::p1::wasi_snapshot_preview1::WasiSnapshotPreview1 as _;
    let fuel = c.as_context_mut().hostcall_fuel();
    let memory = c
        .get_export("memory")
        .and_then(wasmtime::Extern::into_memory)
        .ok_or_else(|| wasmtime::format_err!("the runtime exports no `memory`"))?;
    let (bytes, state) = memory.data_and_store_mut(c);
    state.wasi.set_hostcall_fuel(fuel);
    Ok((wiggle::GuestMemory::Unshared(bytes), state))
}

/// The guest's memory and the build's inode numbering.
pub(super) fn guest<'a>(
    c: &'a mut wasmtime::Caller<'_, BuildState>,
) -> wasmtime::Result<(&'a mut [u8], &'a mut std::collections::HashMap<u64, u64>)> {
    let memory = c
        .get_export("memory")
        .and_then(wasmtime::Extern::into_memory)
        .ok_or_else(|| wasmtime::format_err!("the runtime exports no `memory`"))?;
    let (data, state) = memory.data_and_store_mut(c);
    Ok((data, &mut state.inodes))
}

/// The build's number for the host's inode `ino` (0, a pipe's, stays 0).
pub(super) fn build_inode(inodes: &mut std::collections::HashMap<u64, u64>, ino: u64) -> u64 {
    if ino == 0 {
        return 0;
    }
    let next = inodes.len() as u64 + 1;
    *inodes.entry(ino).or_insert(next)
}

pub(super) fn field(data: &mut [u8], at: usize) -> wasmtime::Result<&mut [u8; 8]> {
    at.checked_add(8)
        .and_then(|end| data.get_mut(at..end))
        .and_then(|b| <&mut [u8; 8]>::try_from(b).ok())
        .ok_or_else(|| wasmtime::format_err!("a WASI result outside the guest's memory"))
}

/// A preview-1 `filestat` at `buf`: dev u64, ino u64, filetype u8, nlink u64 at
/// 24, size at 32, atim, mtim, ctim at 40, 48, 56.
pub(super) fn fix_filestat(
    c: &mut wasmtime::Caller<'_, BuildState>,
    buf: i32,
) -> wasmtime::Result<()> {
    let (data, inodes) = guest(c)?;
    fixed_filestat(data, inodes, buf)
}

pub(super) fn fixed_filestat(
    data: &mut [u8],
    inodes: &mut std::collections::HashMap<u64, u64>,
    buf: i32,
) -> wasmtime::Result<()> {
    let at = buf as u32 as usize;
    // All of it or nothing (the inode numbering is not advanced for a fault).
    field(data, at + 56)?;
    let ino = field(data, at + 8)?;
    *ino = build_inode(inodes, u64::from_le_bytes(*ino)).to_le_bytes();
    *field(data, at + 24)? = 1u64.to_le_bytes();
    let epoch = (BUILD_EPOCH.as_nanos() as u64).to_le_bytes();
    for time in [40, 48, 56] {
        *field(data, at + time)? = epoch;
    }
    Ok(())
}

/// The `dirent`s `fd_readdir` wrote at `buf` (`*used` bytes; the last may be cut
/// short): d_next u64, d_ino u64, d_namlen u32, d_type u8, then the name.
pub(super) fn fix_dirents(
    c: &mut wasmtime::Caller<'_, BuildState>,
    buf: i32,
    used: i32,
) -> wasmtime::Result<()> {
    let (data, inodes) = guest(c)?;
    fixed_dirents(data, inodes, buf, used)
}

pub(super) fn fixed_dirents(
    data: &mut [u8],
    inodes: &mut std::collections::HashMap<u64, u64>,
    buf: i32,
    used: i32,
) -> wasmtime::Result<()> {
    let used_at = used as u32 as usize;
    let used = data
        .get(used_at..used_at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| wasmtime::format_err!("a WASI result outside the guest's memory"))?;
    let (start, end) = (buf as u32 as usize, buf as u32 as usize + used as usize);
    let mut at = start;
    while at + 24 <= end {
        let ino = field(data, at + 8)?;
        *ino = build_inode(inodes, u64::from_le_bytes(*ino)).to_le_bytes();
        let namlen = data
            .get(at + 16..at + 20)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(u32::MAX);
        at = at.saturating_add(24).saturating_add(namlen as usize);
    }
    Ok(())
}

pub(super) struct FixedWall;

impl HostWallClock for FixedWall {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        BUILD_EPOCH
    }
}

pub(super) struct FixedMonotonic;

impl HostMonotonicClock for FixedMonotonic {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        0
    }
}
