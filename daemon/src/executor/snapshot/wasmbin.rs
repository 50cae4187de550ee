//! The few bytes of the module format the recipe reads and rewrites.

pub(super) struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, pos: 0 }
    }

    fn done(&self) -> bool {
        self.pos >= self.b.len()
    }

    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.pos).ok_or("truncated module")?;
        self.pos += 1;
        Ok(v)
    }

    fn leb(&mut self) -> Result<u32, String> {
        let mut v: u64 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return u32::try_from(v).map_err(|_| "LEB128 out of range".to_string());
            }
        }
        Err("LEB128 too long".into())
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or("truncated module")?;
        let v = self.b.get(self.pos..end).ok_or("truncated module")?;
        self.pos = end;
        Ok(v)
    }

    fn name(&mut self) -> Result<&'a str, String> {
        let n = self.leb()? as usize;
        std::str::from_utf8(self.bytes(n)?).map_err(|_| "a name is not UTF-8".to_string())
    }
}

pub(super) fn put_leb(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The sections of a core module: (id, start of the section header, payload).
pub(super) fn sections(wasm: &[u8]) -> Result<Vec<(u8, usize, std::ops::Range<usize>)>, String> {
    if wasm.get(..8) != Some(&[0, b'a', b's', b'm', 1, 0, 0, 0]) {
        return Err("not a core wasm module".into());
    }
    let mut r = Reader::new(wasm);
    r.pos = 8;
    let mut out = Vec::new();
    while !r.done() {
        let start = r.pos;
        let id = r.byte()?;
        let len = r.leb()? as usize;
        let body = r.pos..r.pos.checked_add(len).ok_or("truncated module")?;
        r.bytes(len)?;
        out.push((id, start, body));
    }
    Ok(out)
}

/// The function indices of `names`, from the `name` section; an error names the
/// first one missing (a runtime whose internals moved: no snapshot).
pub(super) fn func_indices(wasm: &[u8], names: &[&str]) -> Result<Vec<u32>, String> {
    let mut found: Vec<Option<u32>> = vec![None; names.len()];
    for (id, _, body) in sections(wasm)? {
        if id != 0 {
            continue;
        }
        let mut r = Reader::new(&wasm[body]);
        if r.name()? != "name" {
            continue;
        }
        while !r.done() {
            let sub = r.byte()?;
            let len = r.leb()? as usize;
            let data = r.bytes(len)?;
            if sub != 1 {
                continue;
            }
            let mut f = Reader::new(data);
            for _ in 0..f.leb()? {
                let index = f.leb()?;
                let name = f.name()?;
                if let Some(k) = names.iter().position(|n| *n == name) {
                    found[k].get_or_insert(index);
                }
            }
        }
    }
    names
        .iter()
        .zip(found)
        .map(|(n, i)| {
            i.ok_or_else(|| {
                format!("the runtime has no function `{n}` (an unknown wheel version?)")
            })
        })
        .collect()
}

/// The export section: (name, kind, index).
pub(super) fn exports(wasm: &[u8]) -> Result<Vec<(String, u8, u32)>, String> {
    let mut out = Vec::new();
    for (id, _, body) in sections(wasm)? {
        if id != 7 {
            continue;
        }
        let mut r = Reader::new(&wasm[body]);
        for _ in 0..r.leb()? {
            let name = r.name()?.to_string();
            let kind = r.byte()?;
            let index = r.leb()?;
            out.push((name, kind, index));
        }
    }
    Ok(out)
}

/// The module with its export section replaced by `edit` of its exports.
pub(super) fn rewrite_exports(
    wasm: &[u8],
    edit: impl FnOnce(&mut Vec<(String, u8, u32)>),
) -> Result<Vec<u8>, String> {
    let mut list = exports(wasm)?;
    edit(&mut list);
    let mut body = Vec::new();
    put_leb(&mut body, list.len() as u32);
    for (name, kind, index) in &list {
        put_leb(&mut body, name.len() as u32);
        body.extend_from_slice(name.as_bytes());
        body.push(*kind);
        put_leb(&mut body, *index);
    }
    let mut out = Vec::with_capacity(wasm.len() + 64);
    out.extend_from_slice(&wasm[..8]);
    let mut replaced = false;
    for (id, start, range) in sections(wasm)? {
        if id == 7 {
            out.push(7);
            put_leb(&mut out, body.len() as u32);
            out.extend_from_slice(&body);
            replaced = true;
        } else {
            out.extend_from_slice(&wasm[start..range.end]);
        }
    }
    if !replaced {
        return Err("the module has no export section".into());
    }
    Ok(out)
}

/// The initial size of the module's (first) memory, in bytes.
pub(super) fn initial_memory(wasm: &[u8]) -> Result<u64, String> {
    for (id, _, body) in sections(wasm)? {
        if id != 5 {
            continue;
        }
        let mut r = Reader::new(&wasm[body]);
        if r.leb()? == 0 {
            break;
        }
        let flags = r.byte()?;
        if flags & 0x04 != 0 {
            return Err("a 64-bit memory is not expected here".into());
        }
        return Ok(u64::from(r.leb()?) << 16);
    }
    Err("the module defines no memory".into())
}
