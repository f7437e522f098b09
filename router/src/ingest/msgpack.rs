//! A small, defensive MessagePack reader.
//!
//! Engine batches come from the network, so the reader never trusts a length
//! header: containers are pre-sized by what the remaining input could hold at
//! most, nesting is limited, so is the number of values one message may
//! decode to, and every error is a value, never a panic.

/// A decoded MessagePack value borrowing its strings from the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Nil,
    Bool(bool),
    /// Every integer, signed or not (msgpack's range fits in `i128`).
    Int(i128),
    Float(f64),
    /// A str whose bytes may not be UTF-8; see [`Value::as_str`].
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(Vec<Value<'a>>),
    Map(Vec<(Value<'a>, Value<'a>)>),
    Ext(i8, &'a [u8]),
}

impl<'a> Value<'a> {
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            Value::Str(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    /// Looks a string key up in a map value.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        match self {
            Value::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bin(_) => "bin",
            Value::Array(_) => "array",
            Value::Map(_) => "map",
            Value::Ext(..) => "ext",
        }
    }
}

/// Why a buffer is not one MessagePack value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgpackError {
    /// The input ends inside a value.
    Truncated,
    /// 0xc1, the one byte MessagePack never uses.
    InvalidMarker,
    /// Containers nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// Bytes left after the value.
    TrailingBytes,
    /// More than [`MAX_VALUES`] values.
    TooMany,
}

impl std::fmt::Display for MsgpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MsgpackError::Truncated => "truncated msgpack",
            MsgpackError::InvalidMarker => "invalid msgpack marker 0xc1",
            MsgpackError::TooDeep => "msgpack nested too deeply",
            MsgpackError::TrailingBytes => "trailing bytes after msgpack value",
            MsgpackError::TooMany => "msgpack message decodes to too many values",
        })
    }
}

impl std::error::Error for MsgpackError {}

/// Deepest container nesting accepted (vLLM's batches nest 4 deep).
pub const MAX_DEPTH: usize = 32;

/// Most values one message may decode to. A value takes one input byte at
/// least and 32 bytes decoded, so without a cap a 64 MiB message of one-byte
/// integers would cost 2 GiB; with it, at most 256 MiB. vLLM's batches hold a
/// few values per token (ids and hashes): millions of tokens fit.
pub const MAX_VALUES: usize = 8 << 20;

/// Decodes exactly one value spanning the whole buffer.
pub fn decode(buf: &[u8]) -> Result<Value<'_>, MsgpackError> {
    decode_at_most(buf, MAX_VALUES)
}

/// [`decode`] with a cap of `max_values` values.
pub fn decode_at_most(buf: &[u8], max_values: usize) -> Result<Value<'_>, MsgpackError> {
    let mut r = Reader {
        buf,
        pos: 0,
        values_left: max_values,
        pending: 0,
    };
    let v = r.value(0)?;
    if r.pos != buf.len() {
        return Err(MsgpackError::TrailingBytes);
    }
    Ok(v)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    values_left: usize,
    /// Values the open containers declared and that have not started yet.
    /// Each takes at least one byte still to come, so a container may
    /// reserve room for its values only if the input has a byte for every
    /// one of them beyond these: then every slot ever reserved stands for a
    /// distinct input byte, and decoding allocates at most one `Value` per
    /// input byte, whatever the declared lengths (nested containers that
    /// each claim the whole rest of the input would otherwise reserve it
    /// once per level).
    pending: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgpackError> {
        let end = self.pos.checked_add(n).ok_or(MsgpackError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(MsgpackError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, MsgpackError> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], MsgpackError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len8(&mut self) -> Result<usize, MsgpackError> {
        Ok(self.byte()? as usize)
    }
    fn len16(&mut self) -> Result<usize, MsgpackError> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }
    fn len32(&mut self) -> Result<usize, MsgpackError> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Claims input bytes for `n` values about to be declared: a length
    /// beyond what is left (after the values already declared) is a lie,
    /// and must not size an allocation.
    fn declare(&mut self, n: usize) -> Result<(), MsgpackError> {
        if n > self.remaining().saturating_sub(self.pending) {
            return Err(MsgpackError::Truncated);
        }
        if n > self.values_left {
            return Err(MsgpackError::TooMany);
        }
        self.pending += n;
        Ok(())
    }

    /// One of the declared values, which starts now.
    fn declared_value(&mut self, depth: usize) -> Result<Value<'a>, MsgpackError> {
        self.pending -= 1;
        self.value(depth)
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value<'a>, MsgpackError> {
        self.declare(n)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.declared_value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value<'a>, MsgpackError> {
        self.declare(n.checked_mul(2).ok_or(MsgpackError::Truncated)?)?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.declared_value(depth + 1)?;
            let v = self.declared_value(depth + 1)?;
            items.push((k, v));
        }
        Ok(Value::Map(items))
    }

    fn ext(&mut self, n: usize) -> Result<Value<'a>, MsgpackError> {
        let ty = self.byte()? as i8;
        Ok(Value::Ext(ty, self.take(n)?))
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, MsgpackError> {
        self.values_left = self
            .values_left
            .checked_sub(1)
            .ok_or(MsgpackError::TooMany)?;
        if depth > MAX_DEPTH {
            return Err(MsgpackError::TooDeep);
        }
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => Value::Int(m as i128),
            0x80..=0x8f => return self.map((m & 0x0f) as usize, depth),
            0x90..=0x9f => return self.array((m & 0x0f) as usize, depth),
            0xa0..=0xbf => Value::Str(self.take((m & 0x1f) as usize)?),
            0xc0 => Value::Nil,
            0xc1 => return Err(MsgpackError::InvalidMarker),
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 => {
                let n = self.len8()?;
                Value::Bin(self.take(n)?)
            }
            0xc5 => {
                let n = self.len16()?;
                Value::Bin(self.take(n)?)
            }
            0xc6 => {
                let n = self.len32()?;
                Value::Bin(self.take(n)?)
            }
            0xc7 => {
                let n = self.len8()?;
                return self.ext(n);
            }
            0xc8 => {
                let n = self.len16()?;
                return self.ext(n);
            }
            0xc9 => {
                let n = self.len32()?;
                return self.ext(n);
            }
            0xca => Value::Float(f32::from_be_bytes(self.be()?) as f64),
            0xcb => Value::Float(f64::from_be_bytes(self.be()?)),
            0xcc => Value::Int(self.byte()? as i128),
            0xcd => Value::Int(u16::from_be_bytes(self.be()?) as i128),
            0xce => Value::Int(u32::from_be_bytes(self.be()?) as i128),
            0xcf => Value::Int(u64::from_be_bytes(self.be()?) as i128),
            0xd0 => Value::Int(self.byte()? as i8 as i128),
            0xd1 => Value::Int(i16::from_be_bytes(self.be()?) as i128),
            0xd2 => Value::Int(i32::from_be_bytes(self.be()?) as i128),
            0xd3 => Value::Int(i64::from_be_bytes(self.be()?) as i128),
            0xd4 => return self.ext(1),
            0xd5 => return self.ext(2),
            0xd6 => return self.ext(4),
            0xd7 => return self.ext(8),
            0xd8 => return self.ext(16),
            0xd9 => {
                let n = self.len8()?;
                Value::Str(self.take(n)?)
            }
            0xda => {
                let n = self.len16()?;
                Value::Str(self.take(n)?)
            }
            0xdb => {
                let n = self.len32()?;
                Value::Str(self.take(n)?)
            }
            0xdc => {
                let n = self.len16()?;
                return self.array(n, depth);
            }
            0xdd => {
                let n = self.len32()?;
                return self.array(n, depth);
            }
            0xde => {
                let n = self.len16()?;
                return self.map(n, depth);
            }
            0xdf => {
                let n = self.len32()?;
                return self.map(n, depth);
            }
            0xe0..=0xff => Value::Int(m as i8 as i128),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars() {
        assert_eq!(decode(&[0x05]), Ok(Value::Int(5)));
        assert_eq!(decode(&[0xff]), Ok(Value::Int(-1)));
        assert_eq!(
            decode(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok(Value::Int(u64::MAX as i128))
        );
        assert_eq!(
            decode(&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            Ok(Value::Int(i64::MIN as i128))
        );
        assert_eq!(decode(&[0xa2, b'h', b'i']).unwrap().as_str(), Some("hi"));
        assert_eq!(decode(&[0xc4, 2, 1, 2]), Ok(Value::Bin(&[1, 2])));
        assert_eq!(decode(&[0xc0]), Ok(Value::Nil));
    }

    #[test]
    fn lying_lengths_and_garbage() {
        // array32 claiming 4 billion elements in a 5-byte buffer
        assert_eq!(
            decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(MsgpackError::Truncated)
        );
        assert_eq!(
            decode(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0, 0]),
            Err(MsgpackError::Truncated)
        );
        assert_eq!(decode(&[0xc1]), Err(MsgpackError::InvalidMarker));
        assert_eq!(decode(&[]), Err(MsgpackError::Truncated));
        assert_eq!(decode(&[0x01, 0x02]), Err(MsgpackError::TrailingBytes));
        let deep = vec![0x91u8; 100];
        assert_eq!(decode(&deep), Err(MsgpackError::TooDeep));
    }

    /// Nested containers cannot each claim the rest of the input: the
    /// declared values of every open container need a byte each.
    #[test]
    fn nested_lengths_share_the_input() {
        // [[1, 2], 3, 4]
        let ok = [0x93, 0x92, 0x01, 0x02, 0x03, 0x04];
        assert!(matches!(decode(&ok), Ok(Value::Array(v)) if v.len() == 3));
        // The outer array's two later values leave no byte for the inner
        // array's two: refused before the inner one reserves anything.
        assert_eq!(
            decode(&[0x93, 0x92, 0x01, 0x02, 0x03]),
            Err(MsgpackError::Truncated)
        );
        assert_eq!(
            decode(&[0x83, 0x92, 0x01, 0x02, 0x03, 0x04, 0x05]),
            Err(MsgpackError::Truncated)
        );
    }

    /// An array of a million one-byte integers would decode to 32 MB; past
    /// the cap it is refused before anything is allocated for it.
    #[test]
    fn values_are_capped() {
        let n: u32 = 1 << 20;
        let mut buf = vec![0xdd];
        buf.extend_from_slice(&n.to_be_bytes());
        buf.resize(buf.len() + n as usize, 0x01);
        assert!(
            matches!(decode_at_most(&buf, n as usize + 1), Ok(Value::Array(v)) if v.len() == n as usize)
        );
        assert_eq!(decode_at_most(&buf, n as usize), Err(MsgpackError::TooMany));
        // Nested: the cap counts values at every depth.
        let nested = [0x92, 0x92, 0x01, 0x02, 0x03];
        assert!(decode_at_most(&nested, 5).is_ok());
        assert_eq!(decode_at_most(&nested, 4), Err(MsgpackError::TooMany));
        let map = [0x81, 0x01, 0x02];
        assert!(decode_at_most(&map, 3).is_ok());
        assert_eq!(decode_at_most(&map, 2), Err(MsgpackError::TooMany));
    }
}
