//! A small streaming tar reader with bounded memory, for WebDataset shards.
//!
//! It reads the POSIX ustar, GNU and pax formats one member at a time from any [`Read`]:
//!
//! * 512-byte headers whose checksum (the unsigned byte sum with the checksum field read as
//!   spaces; the historical signed sum is accepted too) must match;
//! * sizes in octal or in GNU base-256 (high bit of the first byte set);
//! * member names from the ustar `prefix` + `name` fields, GNU long names (`L`, and long link
//!   names `K`, whose value is ignored) and pax extended headers (`x`: the `path` and `size`
//!   records apply to the next member; `g`: global records, checked and ignored);
//! * data padded to 512 bytes; the archive ends at the first all-zero block (the standard's
//!   second zero block is not required) or at the end of the input on a header boundary.
//!
//! Nothing is allocated from a size the archive claims: extension headers (long names, pax
//! records) larger than [`MAX_EXTENSION_BYTES`] are an error, unread member data is skipped
//! by streaming it to a sink, and [`TarReader::read_data`] grows its buffer only with bytes
//! actually read. Error messages give the header's byte offset and escape any byte taken from
//! the file that is not printable ASCII (see [`escape_bytes`]).
//!
//! ```
//! use m3ae_data::tarstream::TarReader;
//! let mut h = [0u8; 512];
//! h[..5].copy_from_slice(b"a.txt");
//! h[100..107].copy_from_slice(b"0000644");
//! h[124..135].copy_from_slice(b"00000000002");
//! h[156] = b'0';
//! h[257..263].copy_from_slice(b"ustar\0");
//! h[263..265].copy_from_slice(b"00");
//! h[148..156].fill(b' ');
//! let sum: u32 = h.iter().map(|&b| b as u32).sum();
//! h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
//! let mut tar = h.to_vec();
//! tar.extend_from_slice(b"hi");
//! tar.resize(512 * 4, 0);
//! let mut r = TarReader::new(&tar[..]);
//! let m = r.next_member()?.unwrap();
//! assert_eq!((m.name.as_str(), m.size, m.is_file()), ("a.txt", 2, true));
//! assert_eq!(r.read_data()?, b"hi");
//! assert!(r.next_member()?.is_none());
//! # Ok::<(), m3ae_data::tarstream::TarError>(())
//! ```

use std::io::{self, Read};

/// Block size of the tar format.
pub const BLOCK: u64 = 512;

/// Largest GNU long name / long link or pax extended header accepted, in bytes.
pub const MAX_EXTENSION_BYTES: u64 = 64 << 10;

/// Errors of the tar reader: the archive is truncated, corrupt or hostile.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// Reading the underlying file failed.
    #[error("read error at byte {offset}: {source}")]
    Io {
        /// Byte offset in the archive.
        offset: u64,
        /// The I/O error.
        source: io::Error,
    },
    /// The input ended inside a header or a member's data.
    #[error("archive ends inside {what} at byte {offset}")]
    Truncated {
        /// Byte offset where the input ended.
        offset: u64,
        /// What was being read (`a header`, the data of a member, ...).
        what: String,
    },
    /// A header's checksum does not match its bytes.
    #[error("corrupt header at byte {offset}: checksum field `{field}`, computed {computed:o}")]
    Checksum {
        /// Byte offset of the header.
        offset: u64,
        /// The stored checksum field (escaped).
        field: String,
        /// The unsigned byte sum of the header.
        computed: u32,
    },
    /// A numeric header field cannot be read.
    #[error("corrupt header at byte {offset}: field `{field}` is `{value}`")]
    BadField {
        /// Byte offset of the header.
        offset: u64,
        /// The field (`size`, pax `size`, ...).
        field: &'static str,
        /// Its bytes (escaped).
        value: String,
    },
    /// An extension header (long name, pax records) is larger than [`MAX_EXTENSION_BYTES`].
    #[error(
        "header at byte {offset}: {kind} extension of {size} bytes exceeds {MAX_EXTENSION_BYTES}"
    )]
    ExtensionTooLarge {
        /// Byte offset of the header.
        offset: u64,
        /// `GNU long name`, `pax`, ...
        kind: &'static str,
        /// The size it claims.
        size: u64,
    },
    /// A pax extended header is malformed.
    #[error("corrupt pax header at byte {offset}: {detail}")]
    BadPax {
        /// Byte offset of the header.
        offset: u64,
        /// What is wrong (file bytes escaped).
        detail: String,
    },
}

/// One member's header, extensions applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The path (long name or pax `path` when given); bytes that are not UTF-8 are replaced.
    pub name: String,
    /// The type flag (`b'0'` or `0` regular file, `b'5'` directory, ...).
    pub kind: u8,
    /// Size of the data in bytes (pax `size` when given).
    pub size: u64,
    /// Byte offset of the member's (last) header in the archive.
    pub offset: u64,
}

impl Member {
    /// True for regular files (type `0`, NUL or `7`, contiguous).
    pub fn is_file(&self) -> bool {
        matches!(self.kind, b'0' | 0 | b'7')
    }
}

/// Escapes bytes for messages: printable ASCII is kept, anything else is written `\xNN`;
/// at most `max` input bytes are shown (then `...`).
///
/// ```
/// assert_eq!(m3ae_data::tarstream::escape_bytes(b"ab\x1b[2J\xff", 16), "ab\\x1b[2J\\xff");
/// assert_eq!(m3ae_data::tarstream::escape_bytes(b"abcdef", 3), "abc...");
/// ```
pub fn escape_bytes(bytes: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &b in bytes.iter().take(max) {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    if bytes.len() > max {
        s.push_str("...");
    }
    s
}

/// A streaming tar reader: [`TarReader::next_member`] gives each member's header (skipping
/// whatever was not read of the previous one), [`TarReader::read_data`] its data.
pub struct TarReader<R> {
    inner: R,
    /// Bytes consumed so far.
    pos: u64,
    /// Unread data of the current member.
    data_left: u64,
    /// Padding after the current member's data.
    pad_left: u64,
    done: bool,
}

/// Extensions collected for the next member.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_size: Option<u64>,
}

impl<R: Read> TarReader<R> {
    /// A reader at the start of an archive.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            pos: 0,
            data_left: 0,
            pad_left: 0,
            done: false,
        }
    }

    /// Bytes consumed from the input so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next member (extension headers are read and applied, not returned), or `None` at
    /// the end of the archive. An error ends the archive: later calls return `None`.
    pub fn next_member(&mut self) -> Result<Option<Member>, TarError> {
        if self.done {
            return Ok(None);
        }
        let r = self.next_inner();
        if !matches!(r, Ok(Some(_))) {
            self.done = true;
        }
        r
    }

    fn next_inner(&mut self) -> Result<Option<Member>, TarError> {
        self.skip_rest()?;
        let mut pending = Pending::default();
        loop {
            let offset = self.pos;
            let mut h = [0u8; BLOCK as usize];
            if !self.read_block(&mut h)? {
                return Ok(None);
            }
            if h.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            check_sum(&h, offset)?;
            let kind = h[156];
            let size = parse_number(&h[124..136]).ok_or_else(|| TarError::BadField {
                offset,
                field: "size",
                value: escape_bytes(&h[124..136], 12),
            })?;
            let ext_kind = match kind {
                b'L' => Some("GNU long name"),
                b'K' => Some("GNU long link name"),
                b'x' => Some("pax"),
                b'g' => Some("pax global"),
                _ => None,
            };
            if let Some(ext) = ext_kind {
                if size > MAX_EXTENSION_BYTES {
                    return Err(TarError::ExtensionTooLarge {
                        offset,
                        kind: ext,
                        size,
                    });
                }
                self.start_data(size);
                let body = self.read_data()?;
                match kind {
                    b'L' => pending.long_name = Some(trim_nul(&body).to_vec()),
                    b'K' => {}
                    b'x' => parse_pax(&body, offset, &mut pending)?,
                    _ => parse_pax(&body, offset, &mut Pending::default())?,
                }
                self.skip_rest()?;
                continue;
            }
            let size = pending.pax_size.unwrap_or(size);
            let name = match (pending.pax_path.take(), pending.long_name.take()) {
                (Some(p), _) => p,
                (None, Some(l)) => l,
                (None, None) => ustar_name(&h),
            };
            // Only regular files, GNU sparse and contiguous files carry data counted by the
            // size field in every writer; links, directories and devices have none.
            let data = match kind {
                b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => 0,
                _ => size,
            };
            self.start_data(data);
            return Ok(Some(Member {
                name: String::from_utf8_lossy(&name).into_owned(),
                kind,
                size: data,
                offset,
            }));
        }
    }

    /// The whole data of the current member (what is left of it). The buffer grows with the
    /// bytes actually read, never to a size taken from the header alone; the caller bounds
    /// `Member::size` first.
    pub fn read_data(&mut self) -> Result<Vec<u8>, TarError> {
        let want = self.data_left;
        let mut buf = Vec::with_capacity(want.min(1 << 20) as usize);
        let got = (&mut self.inner)
            .take(want)
            .read_to_end(&mut buf)
            .map_err(|source| TarError::Io {
                offset: self.pos,
                source,
            })? as u64;
        self.pos += got;
        self.data_left -= got;
        if got < want {
            self.done = true;
            return Err(TarError::Truncated {
                offset: self.pos,
                what: format!("member data ({} of {want} bytes missing)", want - got),
            });
        }
        Ok(buf)
    }

    fn start_data(&mut self, size: u64) {
        self.data_left = size;
        self.pad_left = (BLOCK - size % BLOCK) % BLOCK;
    }

    /// Skips the unread data and the padding of the current member.
    fn skip_rest(&mut self) -> Result<(), TarError> {
        // a base-256 size may be close to u64::MAX: the sum must not overflow
        let n = self.data_left.saturating_add(self.pad_left);
        if n == 0 {
            return Ok(());
        }
        let got = io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(|source| {
            TarError::Io {
                offset: self.pos,
                source,
            }
        })?;
        self.pos += got;
        if got < n {
            self.done = true;
            let what = if got < self.data_left {
                format!(
                    "member data ({} of {} bytes missing)",
                    self.data_left - got,
                    self.data_left
                )
            } else {
                format!("the padding after a member ({} bytes missing)", n - got)
            };
            return Err(TarError::Truncated {
                offset: self.pos,
                what,
            });
        }
        self.data_left = 0;
        self.pad_left = 0;
        Ok(())
    }

    /// Reads one block; false on a clean end of input before it.
    fn read_block(&mut self, h: &mut [u8; BLOCK as usize]) -> Result<bool, TarError> {
        let mut filled = 0;
        while filled < h.len() {
            match self.inner.read(&mut h[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        self.pos += filled as u64;
        match filled {
            0 => Ok(false),
            512 => Ok(true),
            _ => Err(TarError::Truncated {
                offset: self.pos,
                what: format!("a header ({filled} of 512 bytes)"),
            }),
        }
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// `prefix/name` of a ustar header, `name` alone otherwise (GNU headers use the prefix bytes
/// for other fields).
fn ustar_name(h: &[u8; BLOCK as usize]) -> Vec<u8> {
    let name = trim_nul(&h[..100]);
    let prefix = trim_nul(&h[345..500]);
    if &h[257..263] == b"ustar\0" && !prefix.is_empty() {
        let mut p = prefix.to_vec();
        p.push(b'/');
        p.extend_from_slice(name);
        p
    } else {
        name.to_vec()
    }
}

/// A numeric field: octal digits (leading spaces, ended by NUL or space), or GNU base-256
/// (first byte's high bit set; negative values and overflow are rejected).
fn parse_number(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|&b| b & 0x80 != 0) {
        if f[0] & 0x40 != 0 {
            return None; // negative
        }
        let mut v: u64 = (f[0] & 0x3f) as u64;
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s = f.iter().position(|&b| b != b' ').unwrap_or(f.len());
    let mut v: u64 = 0;
    let mut i = s;
    while i < f.len() && (b'0'..=b'7').contains(&f[i]) {
        v = v.checked_mul(8)?.checked_add((f[i] - b'0') as u64)?;
        i += 1;
    }
    // the digits must end the field or be ended by NUL / space
    if i < f.len() && f[i] != 0 && f[i] != b' ' {
        return None;
    }
    Some(v)
}

fn check_sum(h: &[u8; BLOCK as usize], offset: u64) -> Result<(), TarError> {
    let field = &h[148..156];
    let bad = |computed| TarError::Checksum {
        offset,
        field: escape_bytes(field, 8),
        computed,
    };
    let unsigned: u32 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u32
            }
        })
        .sum();
    let Some(stored) = parse_number(field) else {
        return Err(bad(unsigned));
    };
    let signed: i64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as i8 as i64
            }
        })
        .sum();
    if stored == unsigned as u64 || stored as i64 == signed {
        Ok(())
    } else {
        Err(bad(unsigned))
    }
}

/// Parses pax records `"<len> <key>=<value>\n"` (len counts the whole record), keeping
/// `path` and `size`.
fn parse_pax(body: &[u8], offset: u64, pending: &mut Pending) -> Result<(), TarError> {
    let bad = |detail: String| TarError::BadPax { offset, detail };
    let mut rest = body;
    while !rest.is_empty() {
        // GNU tar pads the body with NULs in some versions
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or_else(|| bad(format!("no record length in `{}`", escape_bytes(rest, 24))))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&l: &usize| l > sp + 1 && l <= rest.len())
            .ok_or_else(|| {
                bad(format!(
                    "record length `{}` is not a number within the header",
                    escape_bytes(&rest[..sp], 20)
                ))
            })?;
        let rec = &rest[sp + 1..len];
        rest = &rest[len..];
        let Some(rec) = rec.strip_suffix(b"\n") else {
            return Err(bad(format!(
                "record `{}` does not end with a newline",
                escape_bytes(rec, 40)
            )));
        };
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad(format!("record `{}` has no `=`", escape_bytes(rec, 40))))?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        match key {
            b"path" => pending.pax_path = Some(value.to_vec()),
            b"size" => {
                let v = std::str::from_utf8(value)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| TarError::BadField {
                        offset,
                        field: "pax size",
                        value: escape_bytes(value, 24),
                    })?;
                pending.pax_size = Some(v);
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block with a valid checksum.
    fn header(name: &[u8], kind: u8, size_field: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name);
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..124 + size_field.len()].copy_from_slice(size_field);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn octal(n: u64) -> Vec<u8> {
        format!("{n:011o}\0").into_bytes()
    }

    fn padded(mut v: Vec<u8>) -> Vec<u8> {
        v.resize(v.len().div_ceil(512) * 512, 0);
        v
    }

    fn members(tar: &[u8]) -> Result<Vec<(String, Vec<u8>)>, TarError> {
        let mut r = TarReader::new(tar);
        let mut out = Vec::new();
        while let Some(m) = r.next_member()? {
            out.push((m.name, r.read_data()?));
        }
        Ok(out)
    }

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(parse_number(b"00000000017\0"), Some(15));
        assert_eq!(parse_number(b"  17 \0\0\0\0\0\0\0"), Some(15));
        assert_eq!(parse_number(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_number(b"12x4"), None);
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[10] = 1;
        f[11] = 2;
        assert_eq!(parse_number(&f), Some(258));
        f[0] = 0xff;
        assert_eq!(parse_number(&f), None);
        let big = [
            0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert_eq!(parse_number(&big), None);
    }

    #[test]
    fn long_names_and_pax_paths_apply_to_the_next_member() {
        let long = "d/".repeat(80) + "k.txt";
        let mut t = header(b"././@LongLink", b'L', &octal(long.len() as u64 + 1));
        t.extend(padded(format!("{long}\0").into_bytes()));
        t.extend(header(b"short", b'0', &octal(1)));
        t.extend(padded(b"a".to_vec()));
        let rec = "path=p/q.jpg\n";
        let rec = format!("{} {rec}", rec.len() + 3);
        let recs = format!("{rec}10 size=3\n");
        t.extend(header(b"PaxHeaders/x", b'x', &octal(recs.len() as u64)));
        t.extend(padded(recs.into_bytes()));
        t.extend(header(b"ignored", b'0', &octal(1)));
        t.extend(padded(b"xyz".to_vec()));
        t.extend([0u8; 1024]);
        let m = members(&t).unwrap();
        assert_eq!(m[0], (long, b"a".to_vec()));
        assert_eq!(m[1], ("p/q.jpg".into(), b"xyz".to_vec()));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn hostile_extensions_fail_without_reading_them() {
        for kind in [b'L', b'K', b'x', b'g'] {
            let mut t = header(b"././@LongLink", kind, &octal(3 << 30));
            t.resize(8192, b'A');
            let err = members(&t).unwrap_err();
            assert!(
                matches!(err, TarError::ExtensionTooLarge { size, .. } if size == 3 << 30),
                "{err}"
            );
        }
    }

    #[test]
    fn corrupt_headers_are_errors_with_escaped_bytes() {
        let mut t = header(b"a.txt", b'0', &octal(1));
        t[148] = 0x1b; // ESC in the checksum field
        let err = members(&t).unwrap_err().to_string();
        assert!(err.contains("\\x1b") && !err.contains('\x1b'), "{err}");
        let t = header(b"a.txt", b'0', b"1\x1b[2J");
        let err = members(&t).unwrap_err().to_string();
        assert!(err.contains("size") && !err.contains('\x1b'), "{err}");
        // truncated header and truncated data
        assert!(matches!(
            members(&t[..100]).unwrap_err(),
            TarError::Truncated { .. }
        ));
        let mut t = header(b"a.txt", b'0', &octal(1000));
        t.extend([b'z'; 10]);
        assert!(matches!(
            members(&t).unwrap_err(),
            TarError::Truncated { .. }
        ));
    }

    #[test]
    fn sizes_near_the_top_of_u64_are_truncation_not_overflow() {
        let mut f = [0xffu8; 12];
        f[0] = 0x80; // base-256, positive: 0x000000 then eight 0xff bytes, 2^64 - 1
        f[1..4].fill(0);
        let mut t = header(b"a.bin", b'0', &f);
        t.extend([1u8; 600]);
        let mut r = TarReader::new(&t[..]);
        assert_eq!(r.next_member().unwrap().unwrap().size, u64::MAX);
        assert!(matches!(
            r.next_member().unwrap_err(),
            TarError::Truncated { .. }
        ));
        assert!(r.next_member().unwrap().is_none());
    }

    #[test]
    fn bad_pax_records_are_errors() {
        for body in [&b"abc"[..], b"99 path=x\n", b"7 pathx\n", b"9 size=-1\n"] {
            let mut t = header(b"PaxHeaders/x", b'x', &octal(body.len() as u64));
            t.extend(padded(body.to_vec()));
            t.extend(header(b"f", b'0', &octal(0)));
            assert!(members(&t).is_err(), "{}", escape_bytes(body, 20));
        }
    }
}
