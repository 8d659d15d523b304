//! Deterministic CBOR (RFC 8949 §4.2.1 core deterministic encoding) for JSON-shaped values.
//!
//! History records, revision hashes and snapshots are hashed over these bytes, so the same
//! value must always give the same bytes: shortest argument heads, definite lengths only, map
//! keys sorted bytewise by their encoding, floats in the shortest form that keeps the value.
//! The decoder is strict: it refuses anything the encoder would not have written, so
//! `encode(decode(b)) == b` holds for every accepted `b`.

use serde_json::{Map, Number, Value};

/// Nesting limit for decoding untrusted bytes.
pub const DEPTH_MAX: usize = 128;

/// Why bytes were refused by [`decode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CborError {
    #[error("CBOR ends early at byte {0}")]
    Truncated(usize),
    #[error("{0} trailing bytes after the CBOR item")]
    Trailing(usize),
    #[error("CBOR is not in core deterministic form at byte {offset}: {reason}")]
    NotDeterministic { offset: usize, reason: &'static str },
    #[error("unsupported CBOR item at byte {offset}: {reason}")]
    Unsupported { offset: usize, reason: &'static str },
    #[error("CBOR nesting deeper than {DEPTH_MAX}")]
    TooDeep,
}

/// Encodes `value` in core deterministic CBOR.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_into(&mut out, value);
    out
}

/// Appends the deterministic encoding of `value` to `out`.
pub fn encode_into(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(0xf6),
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Number(n) => encode_number(out, n),
        Value::String(s) => encode_text(out, s),
        Value::Array(items) => {
            write_head(out, 4, items.len() as u64);
            for item in items {
                encode_into(out, item);
            }
        }
        Value::Object(map) => encode_map(out, map),
    }
}

/// Appends a text string.
pub fn encode_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends a JSON object as a map with its keys in deterministic order.
pub fn encode_map(out: &mut Vec<u8>, map: &Map<String, Value>) {
    write_head(out, 5, map.len() as u64);
    // Text keys sort bytewise by encoding: shorter first, then by bytes.
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by(|a, b| {
        a.len()
            .cmp(&b.len())
            .then_with(|| a.as_bytes().cmp(b.as_bytes()))
    });
    for key in keys {
        encode_text(out, key);
        encode_into(out, &map[key.as_str()]);
    }
}

fn encode_number(out: &mut Vec<u8>, n: &Number) {
    if let Some(u) = n.as_u64() {
        write_head(out, 0, u);
    } else if let Some(i) = n.as_i64() {
        // i < 0 here: CBOR stores -1 - i.
        write_head(out, 1, (-1 - i) as u64);
    } else {
        encode_float(out, n.as_f64().unwrap_or(f64::NAN));
    }
}

fn encode_float(out: &mut Vec<u8>, f: f64) {
    if let Some(half) = f64_to_f16_exact(f) {
        out.push(0xf9);
        out.extend_from_slice(&half.to_be_bytes());
    } else if (f as f32) as f64 == f || f.is_nan() {
        out.push(0xfa);
        out.extend_from_slice(&(f as f32).to_be_bytes());
    } else {
        out.push(0xfb);
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// The binary16 bits of `f` when the conversion is exact.
fn f64_to_f16_exact(f: f64) -> Option<u16> {
    if f.is_nan() {
        return Some(0x7e00);
    }
    if f.is_infinite() {
        return Some(if f > 0.0 { 0x7c00 } else { 0xfc00 });
    }
    let sign: u16 = if f.is_sign_negative() { 0x8000 } else { 0 };
    let a = f.abs();
    if a == 0.0 {
        return Some(sign);
    }
    // Normal half range: 2^-14 ..= 65504; subnormals: multiples of 2^-24 below 2^-14.
    if a > 65504.0 {
        return None;
    }
    if a < 6.103515625e-5 {
        let m = a / 5.960464477539063e-8; // 2^-24
        if m.fract() != 0.0 || m < 1.0 {
            return None;
        }
        return Some(sign | m as u16);
    }
    let exp = a.log2().floor() as i32;
    let exp = if 2f64.powi(exp) > a { exp - 1 } else { exp };
    let mantissa = a / 2f64.powi(exp) - 1.0; // in [0, 1)
    let scaled = mantissa * 1024.0;
    if scaled.fract() != 0.0 {
        return None;
    }
    let biased = (exp + 15) as u16;
    if biased == 0 || biased >= 31 {
        return None;
    }
    Some(sign | (biased << 10) | scaled as u16)
}

fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1f) as i32;
    let mant = (bits & 0x3ff) as f64;
    match exp {
        0 => sign * mant * 2f64.powi(-24),
        31 if mant == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1.0 + mant / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// Writes a major type head with the shortest argument.
pub fn write_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    if arg < 24 {
        out.push(m | arg as u8);
    } else if arg <= u8::MAX as u64 {
        out.extend_from_slice(&[m | 24, arg as u8]);
    } else if arg <= u16::MAX as u64 {
        out.push(m | 25);
        out.extend_from_slice(&(arg as u16).to_be_bytes());
    } else if arg <= u32::MAX as u64 {
        out.push(m | 26);
        out.extend_from_slice(&(arg as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&arg.to_be_bytes());
    }
}

/// Decodes one deterministic CBOR item that spans all of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Value, CborError> {
    let mut decoder = Decoder { bytes, pos: 0 };
    let value = decoder.item(0)?;
    if decoder.pos != bytes.len() {
        return Err(CborError::Trailing(bytes.len() - decoder.pos));
    }
    Ok(value)
}

/// Decodes the deterministic CBOR item at the start of `bytes` (more may follow); returns it
/// with its length. Used by readers of documents that mix JSON-shaped items with byte strings.
pub fn decode_prefix(bytes: &[u8]) -> Result<(Value, usize), CborError> {
    let mut decoder = Decoder { bytes, pos: 0 };
    let value = decoder.item(0)?;
    Ok((value, decoder.pos))
}

/// Reads the head at the start of `bytes`: (major type, argument, length of the head).
/// Refuses indefinite lengths, reserved forms and arguments not in shortest form (for major
/// type 7 the argument is the raw simple value or float bits).
pub fn read_head(bytes: &[u8]) -> Result<(u8, u64, usize), CborError> {
    let mut decoder = Decoder { bytes, pos: 0 };
    let (major, _, arg) = decoder.head()?;
    Ok((major, arg, decoder.pos))
}

/// Appends a byte string.
pub fn encode_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_head(out, 2, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads the text values of the given keys of a top-level map without decoding the rest:
/// `out[i]` is the value of `keys[i]` when present and a text string. Used by stores for cheap
/// pair assertions on record bytes whose hash was already checked.
pub fn top_level_texts<'a>(
    bytes: &'a [u8],
    keys: &[&str],
) -> Result<Vec<Option<&'a str>>, CborError> {
    let mut decoder = Decoder { bytes, pos: 0 };
    let mut out = vec![None; keys.len()];
    let (major, _, n_entries) = decoder.head()?;
    if major != 5 {
        return Err(CborError::Unsupported {
            offset: 0,
            reason: "not a map",
        });
    }
    for _ in 0..n_entries {
        let key = decoder.text_ref()?;
        let value_start = decoder.pos;
        match keys.iter().position(|k| *k == key) {
            Some(i) => {
                let (major, _, len) = decoder.head()?;
                if major == 3 {
                    let len =
                        usize::try_from(len).map_err(|_| CborError::Truncated(value_start))?;
                    let raw = decoder.take(len)?;
                    out[i] = std::str::from_utf8(raw).ok();
                } else {
                    decoder.pos = value_start;
                    decoder.skip(0)?;
                }
            }
            None => decoder.skip(0)?,
        }
    }
    Ok(out)
}

/// A scalar read by [`top_level_scalars`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar<'a> {
    Text(&'a str),
    Uint(u64),
    /// Present, but neither a text string nor an unsigned integer.
    Other,
}

/// Reads the text and unsigned-integer values of the given keys of a top-level map without
/// building the rest (it is walked and its structure checked); `out[i]` is the value of
/// `keys[i]`. The map must span all of `bytes`. Used to check hash-chain links fast.
pub fn top_level_scalars<'a>(
    bytes: &'a [u8],
    keys: &[&str],
) -> Result<Vec<Option<Scalar<'a>>>, CborError> {
    let mut decoder = Decoder { bytes, pos: 0 };
    let mut out = vec![None; keys.len()];
    let (major, _, n_entries) = decoder.head()?;
    if major != 5 {
        return Err(CborError::Unsupported {
            offset: 0,
            reason: "not a map",
        });
    }
    for _ in 0..n_entries {
        let key = decoder.text_ref()?;
        let value_start = decoder.pos;
        match keys.iter().position(|k| *k == key) {
            Some(i) => {
                let (major, _, arg) = decoder.head()?;
                out[i] = Some(match major {
                    0 => Scalar::Uint(arg),
                    3 => {
                        let len =
                            usize::try_from(arg).map_err(|_| CborError::Truncated(value_start))?;
                        let raw = decoder.take(len)?;
                        std::str::from_utf8(raw).map_or(Scalar::Other, Scalar::Text)
                    }
                    _ => {
                        decoder.pos = value_start;
                        decoder.skip(0)?;
                        Scalar::Other
                    }
                });
            }
            None => decoder.skip(0)?,
        }
    }
    if decoder.pos != bytes.len() {
        return Err(CborError::Trailing(bytes.len() - decoder.pos));
    }
    Ok(out)
}

struct Decoder<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CborError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(CborError::Truncated(self.pos))?;
        let slice = self
            .bytes
            .get(self.pos..end)
            .ok_or(CborError::Truncated(self.pos))?;
        self.pos = end;
        Ok(slice)
    }

    /// Reads a head; returns (major, additional info, argument).
    fn head(&mut self) -> Result<(u8, u8, u64), CborError> {
        let start = self.pos;
        let first = self.take(1)?[0];
        let major = first >> 5;
        let info = first & 0x1f;
        let arg = match info {
            0..=23 => info as u64,
            24 => self.take(1)?[0] as u64,
            25 => u16::from_be_bytes(self.take(2)?.try_into().unwrap_or_default()) as u64,
            26 => u32::from_be_bytes(self.take(4)?.try_into().unwrap_or_default()) as u64,
            27 => u64::from_be_bytes(self.take(8)?.try_into().unwrap_or_default()),
            31 => {
                return Err(CborError::NotDeterministic {
                    offset: start,
                    reason: "indefinite length",
                });
            }
            _ => {
                return Err(CborError::Unsupported {
                    offset: start,
                    reason: "reserved additional information",
                });
            }
        };
        if major != 7 {
            let shortest = match info {
                24 => arg >= 24,
                25 => arg > u8::MAX as u64,
                26 => arg > u16::MAX as u64,
                27 => arg > u32::MAX as u64,
                _ => true,
            };
            if !shortest {
                return Err(CborError::NotDeterministic {
                    offset: start,
                    reason: "argument not in shortest form",
                });
            }
        }
        Ok((major, info, arg))
    }

    /// Reads a text string in place.
    fn text_ref(&mut self) -> Result<&'a str, CborError> {
        let start = self.pos;
        let (major, _, len) = self.head()?;
        if major != 3 {
            return Err(CborError::Unsupported {
                offset: start,
                reason: "map key is not a text string",
            });
        }
        let len = usize::try_from(len).map_err(|_| CborError::Truncated(start))?;
        let end = self
            .pos
            .checked_add(len)
            .ok_or(CborError::Truncated(start))?;
        let raw = self
            .bytes
            .get(self.pos..end)
            .ok_or(CborError::Truncated(start))?;
        self.pos = end;
        std::str::from_utf8(raw).map_err(|_| CborError::Unsupported {
            offset: start,
            reason: "text string is not UTF-8",
        })
    }

    /// Skips one item without building it.
    fn skip(&mut self, depth: usize) -> Result<(), CborError> {
        if depth > DEPTH_MAX {
            return Err(CborError::TooDeep);
        }
        let start = self.pos;
        let (major, _, arg) = self.head()?;
        let len = || usize::try_from(arg).map_err(|_| CborError::Truncated(start));
        match major {
            0 | 1 | 7 => Ok(()),
            2 | 3 => self.take(len()?).map(|_| ()),
            4 => {
                for _ in 0..arg {
                    self.skip(depth + 1)?;
                }
                Ok(())
            }
            5 => {
                for _ in 0..arg {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)?;
                }
                Ok(())
            }
            _ => Err(CborError::Unsupported {
                offset: start,
                reason: "tags are not used in cnsm documents",
            }),
        }
    }

    fn item(&mut self, depth: usize) -> Result<Value, CborError> {
        if depth > DEPTH_MAX {
            return Err(CborError::TooDeep);
        }
        let start = self.pos;
        let (major, info, arg) = self.head()?;
        match major {
            0 => Ok(Value::Number(arg.into())),
            1 => {
                let i = i64::try_from(arg).map_err(|_| CborError::Unsupported {
                    offset: start,
                    reason: "negative integer below i64::MIN",
                })?;
                Ok(Value::Number((-1 - i).into()))
            }
            2 => Err(CborError::Unsupported {
                offset: start,
                reason: "byte strings are not used in cnsm documents",
            }),
            3 => {
                let len = usize::try_from(arg).map_err(|_| CborError::Truncated(start))?;
                let raw = self.take(len)?;
                let s = std::str::from_utf8(raw).map_err(|_| CborError::Unsupported {
                    offset: start,
                    reason: "text string is not UTF-8",
                })?;
                Ok(Value::String(s.to_owned()))
            }
            4 => {
                let len = usize::try_from(arg).map_err(|_| CborError::Truncated(start))?;
                let mut items = Vec::with_capacity(len.min(1024));
                for _ in 0..len {
                    items.push(self.item(depth + 1)?);
                }
                Ok(Value::Array(items))
            }
            5 => {
                let len = usize::try_from(arg).map_err(|_| CborError::Truncated(start))?;
                let mut map = Map::new();
                let mut previous_key: Option<&[u8]> = None;
                for _ in 0..len {
                    let key_start = self.pos;
                    let key = match self.item(depth + 1)? {
                        Value::String(s) => s,
                        _ => {
                            return Err(CborError::Unsupported {
                                offset: key_start,
                                reason: "map key is not a text string",
                            });
                        }
                    };
                    let key_bytes = &self.bytes[key_start..self.pos];
                    if let Some(prev) = previous_key
                        && prev >= key_bytes
                    {
                        return Err(CborError::NotDeterministic {
                            offset: key_start,
                            reason: "map keys not sorted or repeated",
                        });
                    }
                    previous_key = Some(key_bytes);
                    let value = self.item(depth + 1)?;
                    map.insert(key, value);
                }
                Ok(Value::Object(map))
            }
            6 => Err(CborError::Unsupported {
                offset: start,
                reason: "tags are not used in cnsm documents",
            }),
            _ => self.simple(start, info, arg),
        }
    }

    fn simple(&mut self, start: usize, info: u8, arg: u64) -> Result<Value, CborError> {
        let float = match info {
            20 => return Ok(Value::Bool(false)),
            21 => return Ok(Value::Bool(true)),
            22 => return Ok(Value::Null),
            25 => f16_to_f64(arg as u16),
            26 => f32::from_bits(arg as u32) as f64,
            27 => f64::from_bits(arg),
            _ => {
                return Err(CborError::Unsupported {
                    offset: start,
                    reason: "simple value",
                });
            }
        };
        // Only the shortest exact float form is deterministic.
        let mut check = Vec::with_capacity(9);
        encode_float(&mut check, float);
        if check.len() != self.pos - start {
            return Err(CborError::NotDeterministic {
                offset: start,
                reason: "float not in shortest form",
            });
        }
        // JSON has no NaN or infinities.
        Number::from_f64(float)
            .map(Value::Number)
            .ok_or(CborError::Unsupported {
                offset: start,
                reason: "non-finite float",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn known_encodings_from_rfc_8949_appendix_a() {
        let cases = [
            (json!(0), "00"),
            (json!(23), "17"),
            (json!(24), "1818"),
            (json!(1000), "1903e8"),
            (json!(-1), "20"),
            (json!(-1000), "3903e7"),
            (json!(1.5), "f93e00"),
            (json!(100000.5), "fa47c35040"),
            (json!(1.1), "fb3ff199999999999a"),
            (json!(-4.1), "fbc010666666666666"),
            (json!(5.960464477539063e-8), "f90001"),
            (json!("a"), "6161"),
            (json!([1, [2, 3]]), "8201820203"),
            (
                json!({"b": 1, "aa": 2}),
                "a2616201626161 02".replace(' ', "").leak(),
            ),
            (json!(null), "f6"),
            (json!(true), "f5"),
        ];
        for (value, hex) in cases {
            let bytes = encode(&value);
            assert_eq!(to_hex(&bytes), hex, "{value}");
            assert_eq!(decode(&bytes).unwrap(), value);
        }
    }

    #[test]
    fn reads_top_level_texts_without_decoding() {
        let value = json!({"to": "paid", "nested": {"to": "x", "list": [1, 2.5, "y", null]}, "n": -3, "prevHash": "ab"});
        let bytes = encode(&value);
        let found = top_level_texts(&bytes, &["prevHash", "to", "n", "missing"]).unwrap();
        assert_eq!(found, vec![Some("ab"), Some("paid"), None, None]);
    }

    #[test]
    fn refuses_non_deterministic_forms() {
        for hex in [
            "1817",
            "a2616101616101",
            "a26162016161 02",
            "9f01ff",
            "c001",
        ] {
            let bytes = from_hex(&hex.replace(' ', ""));
            assert!(decode(&bytes).is_err(), "{hex} accepted");
        }
    }

    fn to_hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
    fn from_hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
