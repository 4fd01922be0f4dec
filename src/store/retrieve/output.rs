//! Step 4 of a retrieve: copying the chosen K/V rows out (through the session's
//! [`DeviceLink`] when the rows have a registered destination), and the check that the
//! caller's output buffers are large enough.

use super::*;
use crate::store::quant::copy_row;

/// Where step 4 writes the chosen rows.
pub(super) struct RowsOut<'a> {
    pub(super) rows: &'a mut [u8],
    pub(super) dest: Option<RowsDest>,
    pub(super) stride: usize,
    pub(super) rb: usize,
    pub(super) d: usize,
    pub(super) dtype: KeyDtype,
    pub(super) slim: bool,
    /// Int8 rows: dequantized by the CPU into the session dtype, never copied as stored.
    pub(super) int8: bool,
}

/// Step 4's row copy: head `h`'s K rows go to `rows[h][0][..k]`, its V rows to
/// `rows[h][1][..k]`. Through [`DeviceLink::gather`] (one batch of runs per KV head and plane,
/// all submitted before any is waited on) when the rows have a registered destination and
/// every run meets [`RUN_ALIGN`]; with the CPU otherwise. Slim V rows (recomputed, in
/// `hs.values`) and int8 rows (dequantized) are always written by the CPU.
pub(super) fn copy_rows(
    l: &LayerKv,
    link: &dyn DeviceLink,
    heads: &[HeadScratch],
    group: usize,
    o: RowsOut<'_>,
    runs: &mut Vec<Run>,
    tickets: &mut Vec<Ticket>,
) -> Result<()> {
    let (stride, rb) = (o.stride, o.rb);
    let align = RUN_ALIGN as usize;
    let engine = o.dest.filter(|d| d.engine);
    if let Some(dst) = engine {
        if o.int8 {
            return Err(KvdexError::BadRequest(
                "rows into an engine destination are not available for kv_format \"int8\" \
                 (rows are dequantized on the CPU): gather into the response instead"
                    .into(),
            ));
        }
        if o.slim {
            return Err(KvdexError::BadRequest(
                "rows into an engine destination are not available in Slim mode (V rows are \
                 recomputed on the CPU): gather into the response instead"
                    .into(),
            ));
        }
        if rb % align != 0 || dst.offset % RUN_ALIGN != 0 {
            return Err(KvdexError::BadRequest(format!(
                "rows into an engine destination need row bytes ({rb}) and the offset ({}) \
                 to be multiples of {RUN_ALIGN}",
                dst.offset
            )));
        }
    }
    let dest = o
        .dest
        .filter(|dst| !o.int8 && rb % align == 0 && dst.offset % RUN_ALIGN == 0);
    if o.slim {
        for (h, hs) in heads.iter().enumerate() {
            let base = h * 2 * stride * rb;
            for i in 0..hs.k {
                let vo = base + (stride + i) * rb;
                let v = &hs.values[i * o.d..(i + 1) * o.d];
                encode_rows(v, o.dtype, &mut o.rows[vo..vo + rb]);
            }
        }
    }
    let Some(dest) = dest else {
        for (h, hs) in heads.iter().enumerate() {
            let g = h / group;
            let (keys, values) = (l.keys(g, o.dtype, o.d)?, l.values(g, o.dtype, o.d)?);
            let base = h * 2 * stride * rb;
            for (i, &id) in hs.hits.ids[..hs.k].iter().enumerate() {
                let ko = base + i * rb;
                copy_row(&keys, id, o.dtype, &mut o.rows[ko..ko + rb]);
                if !o.slim {
                    let vo = base + (stride + i) * rb;
                    copy_row(&values, id, o.dtype, &mut o.rows[vo..vo + rb]);
                }
            }
        }
        return Ok(());
    };
    tickets.clear();
    let kv_heads = heads.len() / group.max(1);
    let mut failed = None;
    for g in 0..kv_heads {
        let Some((k_arena, v_arena)) = l.arenas(g) else {
            continue;
        };
        let planes = [(k_arena, 0usize)]
            .into_iter()
            .chain(v_arena.filter(|_| !o.slim).map(|v| (v, stride)));
        for (arena, plane_off) in planes {
            runs.clear();
            let first = g * group;
            for (h, hs) in heads.iter().enumerate().skip(first).take(group) {
                let base = (h * 2 * stride + plane_off) * rb;
                runs.extend(hs.hits.ids[..hs.k].iter().enumerate().map(|(i, &id)| Run {
                    src_offset: (id as usize * rb) as u64,
                    dst_offset: dest.offset + (base + i * rb) as u64,
                    len: rb as u64,
                }));
            }
            if runs.is_empty() {
                continue;
            }
            match link.gather(arena, runs, dest.id) {
                Ok(t) => tickets.push(t),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
    }
    // Every submitted gather is waited on, even after a failure: the response bytes must not
    // be handed back while a copy still writes them.
    for t in tickets.drain(..) {
        if let Err(e) = link.wait(t) {
            failed.get_or_insert(e);
        }
    }
    match failed {
        // The engine chose the destination and offset: a range it got wrong is its bad
        // request. Into the response, the daemon chose them, so a failure is the daemon's.
        Some(e) if engine.is_some() => Err(KvdexError::BadRequest(format!(
            "retrieve gather into the engine destination: {e}"
        ))),
        Some(e) => Err(KvdexError::Protocol(format!("retrieve gather: {e}"))),
        None => Ok(()),
    }
}

/// Checks every output slice is sized for `hq` heads of `stride` candidates.
pub(super) fn check_out(
    out: &RetrieveOut<'_>,
    hq: usize,
    d: usize,
    stride: usize,
    rb: usize,
    p: &RetrieveParams,
) -> Result<()> {
    let want = [
        ("k", out.k.len(), hq),
        ("coverage", out.coverage.len(), hq),
        ("ids", out.ids.len(), hq * stride),
        ("scores", out.scores.len(), hq * stride),
        ("out", out.out.len(), if p.attend { hq * d } else { 0 }),
        ("lse", out.lse.len(), if p.attend { hq } else { 0 }),
        (
            "rows",
            out.rows.len(),
            if p.gather && !out.rows_dest.is_some_and(|d| d.engine) {
                hq * 2 * stride * rb
            } else {
                0
            },
        ),
    ];
    for (what, got, need) in want {
        if got < need {
            return Err(KvdexError::BadRequest(format!(
                "retrieve output {what} holds {got}, needs {need}"
            )));
        }
    }
    Ok(())
}
