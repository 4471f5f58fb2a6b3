//! Reads a tar stream entry by entry.
//!
//! Headers are decoded with the `tar` crate's [`tar::Header`] and [`tar::PaxExtensions`];
//! the loop over blocks is ours so that PAX headers and GNU long names are size-checked
//! before a byte of them is buffered, and so that a PAX `size` record moves the stream
//! exactly as it moves every other tar reader.

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::ops::Range;

use tar::Header;

use crate::{Error, LayerError};

/// Largest PAX header or GNU long name accepted (Go's `maxSpecialFileSize`).
pub const MAX_EXTENSION_SIZE: u64 = 1 << 20;

const BLOCK: u64 = 512;

/// Seconds and nanoseconds since the epoch; never before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Time {
    pub(crate) secs: i64,
    pub(crate) nanos: u32,
}

/// One entry's header with its PAX and GNU extensions already merged in.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) typeflag: u8,
    pub(crate) path: Vec<u8>,
    pub(crate) link: Vec<u8>,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: Time,
    pub(crate) atime: Option<Time>,
    pub(crate) size: u64,
    /// Device major and minor, read for character and block devices only.
    pub(crate) device: (u32, u32),
    pub(crate) xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A tar stream positioned between entries or inside one entry's data.
pub(crate) struct TarStream<'r> {
    reader: &'r mut dyn BufRead,
    offset: u64,
    /// Data bytes of the current entry not read yet.
    remaining: u64,
    /// Padding after the current entry's data up to the next block.
    padding: u64,
}

/// Extension headers seen since the last entry.
#[derive(Default)]
struct Pending {
    pax: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Pending {
    fn first_kind(&self) -> Option<&'static str> {
        if self.pax.is_some() {
            Some("PAX header")
        } else if self.long_name.is_some() {
            Some("GNU long name")
        } else if self.long_link.is_some() {
            Some("GNU long link name")
        } else {
            None
        }
    }
}

impl<'r> TarStream<'r> {
    pub(crate) fn new(reader: &'r mut dyn BufRead) -> Self {
        TarStream {
            reader,
            offset: 0,
            remaining: 0,
            padding: 0,
        }
    }

    /// The next entry, or `None` at the end-of-archive marker (or a clean end of stream).
    /// Skips whatever is left of the previous entry's data first.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        let rest = self.remaining + self.padding;
        self.skip(rest).map_err(|e| at_offset(self.offset, e))?;
        self.remaining = 0;
        self.padding = 0;
        let mut pending = Pending::default();
        loop {
            let at = self.offset;
            let block = match self.read_block() {
                Ok(Some(block)) if block.iter().any(|b| *b != 0) => block,
                Ok(_) => {
                    return match pending.first_kind() {
                        Some(kind) => Err(at_offset(at, LayerError::DanglingExtension(kind))),
                        None => Ok(None),
                    };
                }
                Err(e) => return Err(at_offset(at, e)),
            };
            let header = Header::from_byte_slice(&block);
            verify_checksum(header).map_err(|e| at_offset(at, e))?;
            let size = numeric(&block, SIZE, "size").map_err(|e| at_offset(at, e))?;
            let slot = match header.entry_type().as_byte() {
                b'x' => Some(("PAX header", &mut pending.pax)),
                b'L' => Some(("GNU long name", &mut pending.long_name)),
                b'K' => Some(("GNU long link name", &mut pending.long_link)),
                b'g' => {
                    // Global PAX headers are ignored, but still bounded.
                    self.read_extension("PAX global header", size)
                        .map_err(|e| at_offset(at, e))?;
                    continue;
                }
                _ => None,
            };
            if let Some((kind, slot)) = slot {
                if slot.is_some() {
                    return Err(at_offset(at, LayerError::DuplicateExtension(kind)));
                }
                *slot = Some(
                    self.read_extension(kind, size)
                        .map_err(|e| at_offset(at, e))?,
                );
                continue;
            }
            let entry = merge(header, pending, size)?;
            self.remaining = entry.size;
            self.padding = padding(entry.size);
            return Ok(Some(entry));
        }
    }

    /// Reads the current entry's data; 0 at its end.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, LayerError> {
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.read_some(&mut buf[..want]).map_err(read_error)?;
        if n == 0 {
            return Err(LayerError::Truncated);
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// The current entry's next data bytes, straight from the reader's buffer: empty at
    /// the entry's end. [`TarStream::consume_data`] says how many were used.
    pub(crate) fn data(&mut self) -> Result<&[u8], LayerError> {
        if self.remaining == 0 {
            return Ok(&[]);
        }
        let want = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        let buffered = fill_buf(self.reader).map_err(read_error)?;
        if buffered.is_empty() {
            return Err(LayerError::Truncated);
        }
        Ok(&buffered[..buffered.len().min(want)])
    }

    /// Marks `n` bytes of what [`TarStream::data`] returned as used.
    pub(crate) fn consume_data(&mut self, n: usize) {
        self.reader.consume(n);
        self.offset += n as u64;
        self.remaining -= n as u64;
    }

    /// Reads the rest of the stream (end-of-archive blocks and anything after them) so that a
    /// caller hashing the stream sees every byte.
    pub(crate) fn drain(mut self) -> Result<(), Error> {
        self.skip(u64::MAX).or_else(|e| match e {
            LayerError::Truncated => Ok(()),
            reason => Err(Error::Layer {
                path: format!("<data after byte {}>", self.offset),
                reason,
            }),
        })
    }

    fn read_extension(&mut self, kind: &'static str, size: u64) -> Result<Vec<u8>, LayerError> {
        if size > MAX_EXTENSION_SIZE {
            return Err(LayerError::ExtensionTooLarge {
                kind,
                size,
                limit: MAX_EXTENSION_SIZE,
            });
        }
        let mut data = vec![0; size as usize];
        self.read_exact(&mut data)?;
        self.skip(padding(size))?;
        Ok(data)
    }

    fn read_block(&mut self) -> Result<Option<[u8; BLOCK as usize]>, LayerError> {
        let mut block = [0; BLOCK as usize];
        let first = self.read_some(&mut block).map_err(read_error)?;
        if first == 0 {
            return Ok(None);
        }
        self.read_exact(&mut block[first..])?;
        Ok(Some(block))
    }

    fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), LayerError> {
        while !buf.is_empty() {
            match self.read_some(buf).map_err(read_error)? {
                0 => return Err(LayerError::Truncated),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Passes over `amount` bytes without copying them.
    fn skip(&mut self, mut amount: u64) -> Result<(), LayerError> {
        while amount > 0 {
            let buffered = fill_buf(self.reader).map_err(read_error)?.len();
            if buffered == 0 {
                return Err(LayerError::Truncated);
            }
            let n = buffered.min(usize::try_from(amount).unwrap_or(usize::MAX));
            self.reader.consume(n);
            self.offset += n as u64;
            amount -= n as u64;
        }
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.reader.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The reader's buffered bytes, refilled when empty; retried when interrupted.
fn fill_buf(reader: &mut dyn BufRead) -> io::Result<&[u8]> {
    loop {
        match reader.fill_buf() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(_) => break,
        }
    }
    // Filled now: this returns the same bytes, borrowed outside the loop.
    reader.fill_buf()
}

fn read_error(source: io::Error) -> LayerError {
    LayerError::Io {
        op: "read archive",
        source,
    }
}

fn at_offset(offset: u64, reason: LayerError) -> Error {
    Error::Layer {
        path: format!("<header at byte {offset}>"),
        reason,
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Accepts the unsigned and the historical signed sum, as GNU tar and Go do.
fn verify_checksum(header: &Header) -> Result<(), LayerError> {
    let stored = header.cksum().map_err(|_| LayerError::Field("checksum"))?;
    let bytes = header.as_bytes();
    let is_checksum = |i: usize| (148..156).contains(&i);
    let unsigned: u32 = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if is_checksum(i) {
                u32::from(b' ')
            } else {
                u32::from(*b)
            }
        })
        .sum();
    let signed: i64 = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if is_checksum(i) {
                i64::from(b' ')
            } else {
                i64::from(*b as i8)
            }
        })
        .sum();
    if stored == unsigned || i64::from(stored) == signed {
        Ok(())
    } else {
        Err(LayerError::Checksum)
    }
}

/// Builds the entry from its header and the extensions before it. GNU long names win over
/// PAX, which wins over the header, as in Go's reader.
fn merge(header: &Header, pending: Pending, header_size: u64) -> Result<Entry, Error> {
    let header_path = header.path_bytes().into_owned();
    let pax = match &pending.pax {
        Some(data) => parse_pax(data).map_err(|e| layer_error(&header_path, e))?,
        None => Pax::default(),
    };
    let path = match (pending.long_name, &pax.path) {
        (Some(long), _) => until_nul(long),
        (None, Some(path)) => path.clone(),
        (None, None) => header_path,
    };
    build_entry(header, pending.long_link, pax, header_size, &path)
        .map_err(|e| layer_error(&path, e))
}

fn build_entry(
    header: &Header,
    long_link: Option<Vec<u8>>,
    pax: Pax,
    header_size: u64,
    path: &[u8],
) -> Result<Entry, LayerError> {
    let typeflag = header.entry_type().as_byte();
    if typeflag == b'S' || pax.sparse {
        return Err(LayerError::Sparse);
    }
    let bytes = header.as_bytes();
    let mode = numeric(bytes, MODE, "mode")? as u32 & 0o7777;
    let uid = match pax.uid {
        Some(uid) => uid,
        None => valid_id(numeric(bytes, UID, "uid")?).ok_or(LayerError::Field("uid"))?,
    };
    let gid = match pax.gid {
        Some(gid) => gid,
        None => valid_id(numeric(bytes, GID, "gid")?).ok_or(LayerError::Field("gid"))?,
    };
    let mtime = match pax.mtime {
        Some(mtime) => mtime,
        None => header_mtime(&bytes[MTIME])?,
    };
    let device = if matches!(typeflag, b'3' | b'4') {
        let bytes = header.as_bytes();
        (
            device_field(&bytes[DEV_MAJOR])?,
            device_field(&bytes[DEV_MINOR])?,
        )
    } else {
        (0, 0)
    };
    let link = match (long_link, pax.linkpath) {
        (Some(long), _) => until_nul(long),
        (None, Some(link)) => link,
        (None, None) => header
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default(),
    };
    Ok(Entry {
        typeflag,
        path: path.to_vec(),
        link,
        mode,
        uid,
        gid,
        mtime,
        atime: pax.atime,
        // As in Go's reader, links, devices, FIFOs and directories carry no data whatever
        // their size field says, so every reader finds the next header at the same place.
        size: if matches!(typeflag, b'1'..=b'6') {
            0
        } else {
            pax.size.unwrap_or(header_size)
        },
        device,
        xattrs: pax.xattrs,
    })
}

fn layer_error(path: &[u8], reason: LayerError) -> Error {
    Error::Layer {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    }
}

// Numeric fields of a ustar header block.
const MODE: Range<usize> = 100..108;
const UID: Range<usize> = 108..116;
const GID: Range<usize> = 116..124;
const SIZE: Range<usize> = 124..136;
const MTIME: Range<usize> = 136..148;
const DEV_MAJOR: Range<usize> = 329..337;
const DEV_MINOR: Range<usize> = 337..345;

fn numeric(block: &[u8], field: Range<usize>, name: &'static str) -> Result<u64, LayerError> {
    parse_numeric(&block[field]).ok_or(LayerError::Field(name))
}

/// A header mtime; negative base-256 values clamp to the epoch like every other time.
fn header_mtime(field: &[u8]) -> Result<Time, LayerError> {
    if field[0] & 0xc0 == 0xc0 {
        return Ok(Time::default());
    }
    let secs = parse_numeric(field).ok_or(LayerError::Field("mtime"))?;
    Ok(Time {
        secs: i64::try_from(secs).unwrap_or(0),
        nanos: 0,
    })
}

/// A uid or gid that fits in 32 bits and is not -1, which chown reads as "unchanged".
fn valid_id(value: u64) -> Option<u32> {
    u32::try_from(value).ok().filter(|v| *v != u32::MAX)
}

/// Parses a device number field and insists it fits in 32 bits.
fn device_field(field: &[u8]) -> Result<u32, LayerError> {
    let value = parse_numeric(field).ok_or(LayerError::Field("device number"))?;
    u32::try_from(value).map_err(|_| LayerError::DeviceNumber)
}

/// Reads a numeric field as Go does: octal with surrounding spaces and NULs ignored (empty
/// is 0), or GNU base-256; negative base-256 values are refused.
fn parse_numeric(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            return None;
        }
        let mut value: u64 = u64::from(field[0] & 0x3f);
        for b in &field[1..] {
            value = value.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(value);
    }
    let text = std::str::from_utf8(field).ok()?.trim_matches([' ', '\0']);
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn until_nul(mut bytes: Vec<u8>) -> Vec<u8> {
    if let Some(end) = bytes.iter().position(|b| *b == 0) {
        bytes.truncate(end);
    }
    bytes
}

/// The PAX records imaged acts on; later records override earlier ones.
#[derive(Debug, Default, PartialEq)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    mtime: Option<Time>,
    atime: Option<Time>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    sparse: bool,
}

const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

fn parse_pax(data: &[u8]) -> Result<Pax, LayerError> {
    let mut pax = Pax::default();
    for record in tar::PaxExtensions::new(data) {
        let record = record.map_err(|_| LayerError::PaxRecord("<unparsable>".to_owned()))?;
        let key = record.key_bytes();
        let value = record.value_bytes();
        let bad = || LayerError::PaxRecord(String::from_utf8_lossy(key).into_owned());
        match key {
            b"path" => pax.path = Some(value.to_vec()),
            b"linkpath" => pax.linkpath = Some(value.to_vec()),
            b"uid" => pax.uid = Some(decimal(value).and_then(valid_id).ok_or_else(bad)?),
            b"gid" => pax.gid = Some(decimal(value).and_then(valid_id).ok_or_else(bad)?),
            b"size" => pax.size = Some(decimal(value).ok_or_else(bad)?),
            b"mtime" => pax.mtime = Some(pax_time(value).ok_or_else(bad)?),
            b"atime" => pax.atime = Some(pax_time(value).ok_or_else(bad)?),
            _ if key.starts_with(b"GNU.sparse.") => pax.sparse = true,
            _ if key.starts_with(XATTR_PREFIX) && key.len() > XATTR_PREFIX.len() => {
                pax.xattrs
                    .insert(key[XATTR_PREFIX.len()..].to_vec(), value.to_vec());
            }
            _ => {}
        }
    }
    Ok(pax)
}

fn decimal(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Parses a PAX time (`-?digits[.digits]`). Times before the epoch and beyond what a
/// timespec holds become the epoch, as containerd does.
fn pax_time(value: &[u8]) -> Option<Time> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let digits: String = fraction
        .chars()
        .chain(std::iter::repeat('0'))
        .take(9)
        .collect();
    let nanos: u32 = digits.parse().ok()?;
    let secs: Option<i64> = whole.parse().ok();
    match secs {
        Some(secs) if !negative || (secs == 0 && nanos == 0) => Some(Time { secs, nanos }),
        _ => Some(Time::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &str) -> String {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    }

    fn block(kind: u8, name: &str, size: u64) -> Vec<u8> {
        let mut header = Header::new_ustar();
        header.set_entry_type(tar::EntryType::new(kind));
        header.set_path(name).unwrap();
        header.set_mode(0o644);
        header.set_size(size);
        header.set_cksum();
        header.as_bytes().to_vec()
    }

    fn padded(data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        out.resize(data.len().div_ceil(512) * 512, 0);
        out
    }

    fn paths(mut archive: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut stream = TarStream::new(&mut archive);
        let mut out = Vec::new();
        while let Some(entry) = stream.next_entry().unwrap() {
            let mut data = vec![0; 64];
            let mut len = 0;
            loop {
                let n = stream.read_data(&mut data[len..]).unwrap();
                if n == 0 {
                    break;
                }
                len += n;
            }
            data.truncate(len);
            out.push((String::from_utf8(entry.path).unwrap(), data));
        }
        out
    }

    #[test]
    fn a_pax_size_moves_the_stream() {
        let pax = record("size", "5");
        let archive = [
            block(b'x', "pax", pax.len() as u64),
            padded(pax.as_bytes()),
            block(b'0', "sized", 0),
            padded(b"hello"),
            block(b'0', "after", 0),
        ]
        .concat();
        assert_eq!(
            paths(&archive),
            [
                ("sized".to_owned(), b"hello".to_vec()),
                ("after".to_owned(), Vec::new())
            ]
        );
    }

    #[test]
    fn header_only_types_carry_no_data() {
        let archive = [
            block(b'2', "link", 600),
            block(b'0', "next", 1),
            padded(b"n"),
        ]
        .concat();
        assert_eq!(
            paths(&archive),
            [
                ("link".to_owned(), Vec::new()),
                ("next".to_owned(), b"n".to_vec())
            ]
        );
    }

    #[test]
    fn gnu_long_names_win_and_extensions_must_describe_an_entry() {
        let archive = [
            block(b'L', "././@LongLink", 6),
            padded(b"long\0\0"),
            block(b'0', "short", 0),
        ]
        .concat();
        assert_eq!(paths(&archive), [("long".to_owned(), Vec::new())]);

        let mut dangling: &[u8] = &[block(b'L', "././@LongLink", 4), padded(b"name")].concat();
        let err = TarStream::new(&mut dangling).next_entry().unwrap_err();
        assert!(matches!(
            err,
            Error::Layer {
                reason: LayerError::DanglingExtension("GNU long name"),
                ..
            }
        ));

        let twice = [
            block(b'L', "a", 1),
            padded(b"a"),
            block(b'L', "b", 1),
            padded(b"b"),
        ]
        .concat();
        let err = TarStream::new(&mut twice.as_slice())
            .next_entry()
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Layer {
                reason: LayerError::DuplicateExtension(_),
                ..
            }
        ));
    }

    #[test]
    fn pax_times_keep_nanoseconds_and_clamp_to_the_epoch() {
        assert_eq!(
            pax_time(b"1700000000.123456789"),
            Some(Time {
                secs: 1_700_000_000,
                nanos: 123_456_789
            })
        );
        assert_eq!(
            pax_time(b"1700000000.5"),
            Some(Time {
                secs: 1_700_000_000,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            pax_time(b"12.1234567891"),
            Some(Time {
                secs: 12,
                nanos: 123_456_789
            })
        );
        assert_eq!(pax_time(b"0"), Some(Time::default()));
        assert_eq!(pax_time(b"-5.5"), Some(Time::default()));
        assert_eq!(pax_time(b"99999999999999999999999"), Some(Time::default()));
        assert_eq!(pax_time(b"1.2.3"), None);
        assert_eq!(pax_time(b""), None);
    }

    #[test]
    fn pax_records_override_and_collect_xattrs() {
        let data = [
            record("path", "first"),
            record("path", "second"),
            record("uid", "3000000"),
            record("mtime", "1.25"),
            record("SCHILY.xattr.user.k", "v"),
            record("LIBARCHIVE.xattr.user.k", "ignored"),
            record("uname", "nobody"),
        ]
        .concat();
        let pax = parse_pax(data.as_bytes()).unwrap();
        assert_eq!(pax.path.as_deref(), Some(&b"second"[..]));
        assert_eq!(pax.uid, Some(3_000_000));
        assert_eq!(
            pax.mtime,
            Some(Time {
                secs: 1,
                nanos: 250_000_000
            })
        );
        assert_eq!(pax.xattrs.len(), 1);
        assert_eq!(pax.xattrs[&b"user.k"[..]], b"v");
        assert!(!pax.sparse);

        assert!(
            parse_pax(record("GNU.sparse.map", "0,1").as_bytes())
                .unwrap()
                .sparse
        );
        assert!(matches!(
            parse_pax(record("uid", "x").as_bytes()),
            Err(LayerError::PaxRecord(_))
        ));
        assert!(matches!(
            parse_pax(b"garbage\n"),
            Err(LayerError::PaxRecord(_))
        ));
    }

    #[test]
    fn numeric_fields_accept_octal_and_base_256() {
        assert_eq!(parse_numeric(b"0000003\0"), Some(3));
        assert_eq!(parse_numeric(b"       \0"), Some(0));
        assert_eq!(parse_numeric(&[0x80, 0, 0, 1, 0, 0, 0, 0]), Some(1 << 32));
        assert_eq!(parse_numeric(&[0xff, 0, 0, 0, 0, 0, 0, 1]), None);
        assert!(matches!(
            device_field(&[0x80, 0, 0, 1, 0, 0, 0, 0]),
            Err(LayerError::DeviceNumber)
        ));
        assert_eq!(device_field(b"0000001\0").unwrap(), 1);
    }
}
