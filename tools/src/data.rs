//! Reading `.npy` data sets in the layout of ../shared/data, and the benchmark split.
//!
//! A data set directory holds `meta.json` (`T`, `layers`, `kv_head_of_q_head`, `cfg.hd`) and per
//! layer `K_L{l}.npy` / `V_L{l}.npy` (`[kv_heads, T, dim]`) and `Q_L{l}.npy` (`[q_heads, T,
//! dim]`), all little-endian float16. The split every benchmark uses (DESIGN.md): context =
//! positions `[0, T-256)`, prefill (training) queries = the same positions (causal), decode
//! (test) queries = `[T-256, T)`.

use half::f16;
use kvdex::error::{KvdexError, Result};
use std::path::{Path, PathBuf};

/// Decode (test) queries at the end of every sequence.
pub const TEST_QUERIES: usize = 256;

/// A float16 array read from an `.npy` file.
#[derive(Clone, Debug)]
pub struct Npy {
    /// C-order shape.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f16>,
}

fn bad(path: &Path, why: impl std::fmt::Display) -> KvdexError {
    KvdexError::Data(format!("{}: {why}", path.display()))
}

/// Reads a little-endian float16, C-order `.npy` file (format versions 1 to 3).
pub fn read_npy_f16(path: &Path) -> Result<Npy> {
    let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not an .npy file (bad magic)"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(path, format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad(path, "truncated or non-UTF-8 header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or_else(|| bad(path, "header has no descr"))?;
    if !(descr.starts_with("'<f2'") || descr.starts_with("'float16'")) {
        let got = descr.split(',').next().unwrap_or(descr);
        return Err(bad(
            path,
            format!("dtype {got} is not little-endian float16 ('<f2')"),
        ));
    }
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err(bad(path, "Fortran-order arrays are not supported"));
    }
    let shape_txt = field("shape").ok_or_else(|| bad(path, "header has no shape"))?;
    let inner = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad(path, "malformed shape"))?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(path, format!("bad shape entry {s:?}")))
        })
        .collect::<Result<_>>()?;
    // A corrupt header can name any shape: the element count must not overflow.
    let count = shape
        .iter()
        .try_fold(2usize, |n, &d| n.checked_mul(d))
        .map(|bytes| bytes / 2)
        .ok_or_else(|| bad(path, format!("shape {shape:?} is too large")))?;
    let body = &bytes[hstart + hlen..];
    if body.len() != count * 2 {
        return Err(bad(
            path,
            format!("{} data bytes for shape {shape:?}", body.len()),
        ));
    }
    let data = body
        .chunks_exact(2)
        .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])));
    Ok(Npy {
        shape,
        data: data.collect(),
    })
}

/// Writes `data` as a little-endian float16 `.npy` file of `shape`.
pub fn write_npy_f16(path: &Path, shape: &[usize], data: &[f16]) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(bad(
            path,
            format!("{} elements for shape {shape:?}", data.len()),
        ));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f2', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 2);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_bits().to_le_bytes());
    }
    std::fs::write(path, out).map_err(|e| bad(path, e))
}

/// What meta.json says about a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// Tokens per sequence.
    pub tokens: usize,
    /// Layers present on disk.
    pub layers: Vec<u32>,
    /// KV head of each query head (GQA).
    pub kv_head_of_q_head: Vec<usize>,
    /// Head dimension.
    pub dim: usize,
}

impl Meta {
    /// Number of query heads.
    pub fn q_heads(&self) -> usize {
        self.kv_head_of_q_head.len()
    }
    /// Number of KV heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_head_of_q_head.iter().max().map_or(0, |m| m + 1)
    }
    /// Context length of the benchmark split: positions `[0, T-256)`.
    pub fn context(&self) -> usize {
        self.tokens.saturating_sub(TEST_QUERIES)
    }
}

/// Checks that `map` (the KV head of each query head) is the grouped GQA layout the daemon
/// and every benchmark assume: query head `h` reads KV head `h / group`. Another layout would
/// be measured one way by `bench recall` (which reads the map) and another by the daemon.
fn check_grouped(map: &[usize]) -> std::result::Result<(), String> {
    let kv_heads = map.iter().max().map_or(0, |m| m + 1);
    if kv_heads == 0 || !map.len().is_multiple_of(kv_heads) {
        return Err(format!(
            "kv_head_of_q_head {map:?}: {} query heads are not a multiple of {kv_heads} KV heads",
            map.len()
        ));
    }
    let group = map.len() / kv_heads;
    match map.iter().enumerate().find(|&(h, &g)| g != h / group) {
        Some((h, &g)) => Err(format!(
            "kv_head_of_q_head {map:?}: query head {h} reads KV head {g}, but kvdex groups \
             query heads contiguously (head h reads KV head h / {group} = {})",
            h / group
        )),
        None => Ok(()),
    }
}

/// The position `[head, token, dim]` and value of the first non-finite element of `a`.
fn first_non_finite(a: &Npy) -> Option<(Vec<usize>, f32)> {
    let at = a.data.iter().position(|x| !x.is_finite())?;
    let mut index = vec![0; a.shape.len()];
    let mut rest = at;
    for (i, &d) in a.shape.iter().enumerate().rev() {
        index[i] = rest % d.max(1);
        rest /= d.max(1);
    }
    Some((index, a.data[at].to_f32()))
}

/// One layer's arrays.
#[derive(Clone, Debug)]
pub struct Layer {
    /// `[kv_heads, T, dim]`.
    pub k: Npy,
    /// `[kv_heads, T, dim]`.
    pub v: Npy,
    /// `[q_heads, T, dim]`.
    pub q: Npy,
}

impl Layer {
    /// Rows `[from, to)` of head `h` of a `[heads, T, dim]` array.
    pub fn rows(a: &Npy, h: usize, from: usize, to: usize) -> &[f16] {
        let (t, d) = (a.shape[1], a.shape[2]);
        &a.data[(h * t + from) * d..(h * t + to) * d]
    }
}

/// A data set directory.
#[derive(Clone, Debug)]
pub struct DataSet {
    /// Where it lives.
    pub dir: PathBuf,
    /// Its meta.json.
    pub meta: Meta,
}

impl DataSet {
    /// Opens `dir` and validates meta.json.
    pub fn open(dir: &Path) -> Result<Self> {
        let mp = dir.join("meta.json");
        let txt = std::fs::read_to_string(&mp).map_err(|e| bad(&mp, e))?;
        let v: serde_json::Value = serde_json::from_str(&txt).map_err(|e| bad(&mp, e))?;
        let num = |x: &serde_json::Value| x.as_u64().map(|n| n as usize);
        let tokens = num(&v["T"]).ok_or_else(|| bad(&mp, "missing integer T"))?;
        let dim = num(&v["cfg"]["hd"]).ok_or_else(|| bad(&mp, "missing integer cfg.hd"))?;
        let layers: Vec<u32> = v["layers"]
            .as_array()
            .ok_or_else(|| bad(&mp, "missing array layers"))?
            .iter()
            .map(|x| {
                x.as_u64()
                    .map(|n| n as u32)
                    .ok_or_else(|| bad(&mp, "non-integer layer"))
            })
            .collect::<Result<_>>()?;
        let kv_head_of_q_head: Vec<usize> = v["kv_head_of_q_head"]
            .as_array()
            .ok_or_else(|| bad(&mp, "missing array kv_head_of_q_head"))?
            .iter()
            .map(|x| num(x).ok_or_else(|| bad(&mp, "non-integer kv head")))
            .collect::<Result<_>>()?;
        if tokens <= TEST_QUERIES || dim == 0 || kv_head_of_q_head.is_empty() {
            return Err(bad(
                &mp,
                format!("need T > {TEST_QUERIES}, hd > 0 and query heads"),
            ));
        }
        if layers.is_empty() {
            return Err(bad(&mp, "layers is empty: the data set holds no layer"));
        }
        check_grouped(&kv_head_of_q_head).map_err(|why| bad(&mp, why))?;
        let meta = Meta {
            tokens,
            layers,
            kv_head_of_q_head,
            dim,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    /// Loads one layer and checks every array's shape against meta.json.
    pub fn layer(&self, l: u32) -> Result<Layer> {
        let m = &self.meta;
        let load = |name: &str, heads: usize| -> Result<Npy> {
            let p = self.dir.join(format!("{name}_L{l}.npy"));
            let a = read_npy_f16(&p)?;
            if a.shape != [heads, m.tokens, m.dim] {
                return Err(bad(
                    &p,
                    format!(
                        "shape {:?}, expected [{heads}, {}, {}]",
                        a.shape, m.tokens, m.dim
                    ),
                ));
            }
            // A NaN or Inf would surface far from here as a NaN mass or an LSE error.
            if let Some((at, x)) = first_non_finite(&a) {
                return Err(bad(&p, format!("value {x} at {at:?} is not finite")));
            }
            Ok(a)
        };
        Ok(Layer {
            k: load("K", m.kv_heads())?,
            v: load("V", m.kv_heads())?,
            q: load("Q", m.q_heads())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("kvdex-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let data: Vec<f16> = (0..24).map(|i| f16::from_f32(i as f32 * 0.5)).collect();
        write_npy_f16(&p, &[2, 3, 4], &data).unwrap();
        let a = read_npy_f16(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3, 4]);
        assert_eq!(a.data, data);
        // A header whose shape overflows the element count.
        let mut huge = b"\x93NUMPY\x01\x00".to_vec();
        let header =
            "{'descr': '<f2', 'fortran_order': False, 'shape': (4611686018427387904, 4), }\n";
        huge.extend_from_slice(&(header.len() as u16).to_le_bytes());
        huge.extend_from_slice(header.as_bytes());
        std::fs::write(&p, &huge).unwrap();
        let e = read_npy_f16(&p).unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(matches!(read_npy_f16(&p), Err(KvdexError::Data(_))));
        assert!(read_npy_f16(&dir.join("missing.npy")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A data set dir holding `meta` and one layer (17) of K/V/Q arrays of `T` 300, dim 2.
    fn data_set(tag: &str, meta: &str, bad_k: Option<(usize, f32)>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvdex-ds-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("meta.json"), meta).unwrap();
        let rows = |heads: usize| vec![f16::from_f32(0.5); heads * 300 * 2];
        let mut k = rows(1);
        if let Some((at, x)) = bad_k {
            k[at] = f16::from_f32(x);
        }
        write_npy_f16(&dir.join("K_L17.npy"), &[1, 300, 2], &k).unwrap();
        write_npy_f16(&dir.join("V_L17.npy"), &[1, 300, 2], &rows(1)).unwrap();
        write_npy_f16(&dir.join("Q_L17.npy"), &[2, 300, 2], &rows(2)).unwrap();
        dir
    }

    const META: &str =
        r#"{"T": 300, "layers": [17], "kv_head_of_q_head": [0, 0], "cfg": {"hd": 2}}"#;

    #[test]
    fn data_sets_are_checked_on_open_and_load() {
        let dir = data_set("ok", META, None);
        let ds = DataSet::open(&dir).unwrap();
        assert_eq!((ds.meta.q_heads(), ds.meta.kv_heads()), (2, 1));
        assert_eq!(ds.layer(17).unwrap().k.shape, vec![1, 300, 2]);
        let e = ds.layer(3).unwrap_err().to_string();
        assert!(e.contains("K_L3.npy"), "{e}");
        std::fs::remove_dir_all(&dir).ok();

        let refused = |tag: &str, meta: &str, want: &str| {
            let dir = data_set(tag, meta, None);
            let e = DataSet::open(&dir).unwrap_err().to_string();
            assert!(e.contains("meta.json") && e.contains(want), "{tag}: {e}");
            std::fs::remove_dir_all(&dir).ok();
        };
        refused("nolayers", &META.replace("[17]", "[]"), "layers is empty");
        refused("trunc", &META[..20], "EOF");
        refused("noT", &META.replace("\"T\"", "\"U\""), "missing integer T");
        let interleaved =
            r#"{"T": 300, "layers": [17], "kv_head_of_q_head": [0, 1, 0, 1], "cfg": {"hd": 2}}"#;
        refused("interleaved", interleaved, "query head 1 reads KV head 1");
        let uneven =
            r#"{"T": 300, "layers": [17], "kv_head_of_q_head": [0, 0, 1], "cfg": {"hd": 2}}"#;
        refused("uneven", uneven, "not a multiple");
    }

    #[test]
    fn a_non_finite_value_in_an_array_is_named_with_its_position() {
        let dir = data_set("nan", META, Some((2 * 5 + 1, f32::NAN)));
        let e = DataSet::open(&dir)
            .unwrap()
            .layer(17)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("K_L17.npy") && e.contains("NaN at [0, 5, 1]"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
