//! The wasip2 filesystem functions wrapped around wasmtime-wasi's own: the
//! [`Disk`] budget.

use std::sync::{Arc, Mutex};

use wasmtime::component::{Linker as ComponentLinker, LinkerInstance, Resource, ResourceTable};
use wasmtime_wasi::filesystem::{Descriptor as FsDescriptor, WasiFilesystemView as _};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    DescriptorFlags, DescriptorType, ErrorCode, HostDescriptor, OpenFlags, PathFlags,
};
use wasmtime_wasi::p2::{DynOutputStream, OutputStream, Pollable, StreamError, StreamResult};

use super::P2State;
use super::disk::Disk;

/// The wasip2 interface whose functions [`wrap_p2`] replaces (what
/// `add_to_linker_async` defines; a component importing an older 0.2 version is
/// linked to it too).
const P2_FILESYSTEM: &str = "wasi:filesystem/types@0.2.12";

/// The host file behind a wasip2 descriptor, if it is a file.
fn p2_file(
    table: &ResourceTable,
    fd: &Resource<FsDescriptor>,
) -> wasmtime::Result<Option<Arc<std::fs::File>>> {
    Ok(match table.get(fd)? {
        FsDescriptor::File(f) => Some(f.file.clone()),
        FsDescriptor::Dir(_) => None,
    })
}

/// A wasip2 filesystem result as the component ABI returns it: the error code,
/// or a trap for anything that is not one.
fn p2_result<T>(r: wasmtime_wasi::p2::FsResult<T>) -> wasmtime::Result<Result<T, ErrorCode>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Ok(Err(e.downcast()?)),
    }
}

/// What the regular file at `path` under `dir` holds, and its metadata hash
/// (`None` for anything else or nothing there).
async fn p2_path_stat(
    view: &mut wasmtime_wasi::filesystem::WasiFilesystemCtxView<'_>,
    dir: &Resource<FsDescriptor>,
    flags: PathFlags,
    path: &str,
) -> Option<(u64, u64, (u64, u64))> {
    let st = HostDescriptor::stat_at(view, Resource::new_borrow(dir.rep()), flags, path.into())
        .await
        .ok()?;
    if st.type_ != DescriptorType::RegularFile {
        return None;
    }
    let h =
        HostDescriptor::metadata_hash_at(view, Resource::new_borrow(dir.rep()), flags, path.into())
            .await
            .ok()?;
    Some((st.size, st.link_count, (h.lower, h.upper)))
}

/// An output stream of a file, within the guest's [`Disk`] budget.
struct BudgetedStream {
    inner: DynOutputStream,
    file: Arc<std::fs::File>,
    /// Where the next write lands; `None` for an append stream (the end).
    at: Option<u64>,
    disk: Arc<Mutex<Disk>>,
}

impl BudgetedStream {
    /// Charges what writing `n` bytes grows the file by, or refuses it with ENOSPC.
    /// (Charged before the write, which may finish in the background: a write that
    /// then fails stays counted.)
    fn admit(&mut self, n: usize) -> StreamResult<()> {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        let start = self.at.unwrap_or(size);
        let growth = start.saturating_add(n as u64).saturating_sub(size);
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if !disk.admit(growth) {
            return Err(StreamError::LastOperationFailed(wasmtime::Error::new(
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            )));
        }
        disk.charge(growth);
        if let Some(at) = &mut self.at {
            *at = at.saturating_add(n as u64);
        }
        Ok(())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BudgetedStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for BudgetedStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.admit(bytes.len())?;
        self.inner.write(bytes)
    }

    async fn blocking_write_and_flush(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.admit(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, n: usize) -> StreamResult<()> {
        self.admit(n)?;
        self.inner.write_zeroes(n)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    async fn write_ready(&mut self) -> StreamResult<usize> {
        self.inner.write_ready().await
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

/// Replaces the stream `r` opened on `file` with a [`BudgetedStream`] of it.
fn budgeted_stream(
    table: &mut ResourceTable,
    r: wasmtime_wasi::p2::FsResult<Resource<DynOutputStream>>,
    file: Option<Arc<std::fs::File>>,
    at: Option<u64>,
    disk: Arc<Mutex<Disk>>,
) -> wasmtime::Result<Result<Resource<DynOutputStream>, ErrorCode>> {
    let stream = match p2_result(r)? {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let Some(file) = file else {
        return Ok(Ok(stream));
    };
    let inner = table.delete(stream)?;
    let wrapped: DynOutputStream = Box::new(BudgetedStream {
        inner,
        file,
        at,
        disk,
    });
    Ok(Ok(table.push(wrapped)?))
}

/// The wasip2 side of the [`Disk`] budget: the filesystem functions that grow
/// files (`write-via-stream` and `append-via-stream`, whose streams are wrapped,
/// `write`, `set-size`) fail with `insufficient-space` past it; `open-at` with
/// `truncate`, `set-size`, `unlink-file-at` and `rename-at` give bytes back (a
/// file unlinked while the guest holds it stays counted). wasip2 has no
/// `allocate`.
pub(super) fn wrap_p2(linker: &mut ComponentLinker<P2State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut fs = linker.instance(P2_FILESYSTEM)?;
    wrap_streams(&mut fs)?;
    wrap_writes(&mut fs)?;
    wrap_unlinks(&mut fs)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `write-via-stream` and `append-via-stream`: their streams are [`BudgetedStream`]s.
fn wrap_streams(fs: &mut LinkerInstance<'_, P2State>) -> wasmtime::Result<()> {
    fs.func_wrap_async(
        "[method]descriptor.write-via-stream",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, offset): (Resource<FsDescriptor>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let r = HostDescriptor::write_via_stream(&mut view, fd, offset);
                Ok((budgeted_stream(view.table, r, file, Some(offset), disk)?,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.append-via-stream",
        |mut store: wasmtime::StoreContextMut<'_, P2State>, (fd,): (Resource<FsDescriptor>,)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let r = HostDescriptor::append_via_stream(&mut view, fd);
                Ok((budgeted_stream(view.table, r, file, None, disk)?,))
            })
        },
    )?;
    Ok(())
}

/// `write` and `set-size`: within the disk budget.
fn wrap_writes(fs: &mut LinkerInstance<'_, P2State>) -> wasmtime::Result<()> {
    fs.func_wrap_async(
        "[method]descriptor.write",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, buf, offset): (Resource<FsDescriptor>, Vec<u8>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let before = file
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map(|m| m.len());
                if let Some(size) = before {
                    let growth = offset.saturating_add(buf.len() as u64).saturating_sub(size);
                    if !disk.lock().unwrap_or_else(|e| e.into_inner()).admit(growth) {
                        return Ok((Err(ErrorCode::InsufficientSpace),));
                    }
                }
                let r = p2_result(HostDescriptor::write(&mut view, fd, buf, offset).await)?;
                if r.is_ok()
                    && let (Some(size), Some(f)) = (before, &file)
                {
                    let after = f.metadata().map(|m| m.len()).unwrap_or(size);
                    disk.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .charge(after.saturating_sub(size));
                }
                Ok((r,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.set-size",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, size): (Resource<FsDescriptor>, u64)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let file = p2_file(view.table, &fd)?;
                let before = file
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map(|m| m.len());
                if let Some(now) = before {
                    let growth = size.saturating_sub(now);
                    if !disk.lock().unwrap_or_else(|e| e.into_inner()).admit(growth) {
                        return Ok((Err(ErrorCode::InsufficientSpace),));
                    }
                }
                let r = p2_result(HostDescriptor::set_size(&mut view, fd, size).await)?;
                if r.is_ok()
                    && let Some(now) = before
                {
                    disk.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .set_size(now, size);
                }
                Ok((r,))
            })
        },
    )?;
    Ok(())
}

/// `open-at` (`truncate`), `unlink-file-at` and `rename-at`: bytes given back.
fn wrap_unlinks(fs: &mut LinkerInstance<'_, P2State>) -> wasmtime::Result<()> {
    fs.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, path_flags, path, open_flags, flags): (
            Resource<FsDescriptor>,
            PathFlags,
            String,
            OpenFlags,
            DescriptorFlags,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let truncated = if open_flags.contains(OpenFlags::TRUNCATE) {
                    p2_path_stat(&mut view, &fd, path_flags, &path).await
                } else {
                    None
                };
                let r = p2_result(
                    HostDescriptor::open_at(&mut view, fd, path_flags, path, open_flags, flags)
                        .await,
                )?;
                if let Ok(opened) = &r {
                    if let Some((size, _, _)) = truncated {
                        disk.lock().unwrap_or_else(|e| e.into_inner()).credit(size);
                    }
                    if let Some(file) = p2_file(view.table, opened)? {
                        let hash = HostDescriptor::metadata_hash(
                            &mut view,
                            Resource::new_borrow(opened.rep()),
                        )
                        .await;
                        if let Ok(h) = hash {
                            disk.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .hold((h.lower, h.upper), &file);
                        }
                    }
                }
                Ok((r,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.unlink-file-at",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, path): (Resource<FsDescriptor>, String)| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let gone = p2_path_stat(&mut view, &fd, PathFlags::empty(), &path).await;
                let r = p2_result(HostDescriptor::unlink_file_at(&mut view, fd, path).await)?;
                if r.is_ok() {
                    p2_unlinked(&disk, gone);
                }
                Ok((r,))
            })
        },
    )?;
    fs.func_wrap_async(
        "[method]descriptor.rename-at",
        |mut store: wasmtime::StoreContextMut<'_, P2State>,
         (fd, old, new_fd, new): (
            Resource<FsDescriptor>,
            String,
            Resource<FsDescriptor>,
            String,
        )| {
            Box::new(async move {
                let state = store.data_mut();
                let disk = state.disk.clone();
                let mut view = state.filesystem();
                let replaced = p2_path_stat(&mut view, &new_fd, PathFlags::empty(), &new).await;
                let moved = p2_path_stat(&mut view, &fd, PathFlags::empty(), &old).await;
                let r =
                    p2_result(HostDescriptor::rename_at(&mut view, fd, old, new_fd, new).await)?;
                // A rename onto another link of the same file removes nothing.
                if r.is_ok() && replaced.map(|s| s.2) != moved.map(|s| s.2) {
                    p2_unlinked(&disk, replaced);
                }
                Ok((r,))
            })
        },
    )?;
    Ok(())
}

/// A wasip2 file (size, links, hash before) lost a link: its last one frees its
/// bytes unless the guest still holds the file.
fn p2_unlinked(disk: &Mutex<Disk>, gone: Option<(u64, u64, (u64, u64))>) {
    let mut d = disk.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((size, 1, hash)) = gone
        && !d.is_held(hash)
    {
        d.credit(size);
    }
}
