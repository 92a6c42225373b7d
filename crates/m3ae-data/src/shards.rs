//! Shard lists: expansion of brace ranges (`cc12m/{00000..02175}.tar`), brace alternatives
//! (`{train,val}.tar`), globs (`shards/*.tar`) and `::`-separated lists, and the assignment of
//! shards to partitions (rank x worker) so that no sample is read twice or lost in an epoch.

use crate::seed::{self, purpose};
use crate::{Error, Partition, Result};
use rand::seq::SliceRandom;
use std::path::PathBuf;

/// Expands a shard specification into paths, in order.
///
/// `::` separates several patterns; each pattern has its first brace group expanded
/// (recursively for the rest): `{a..b}` is a numeric range, zero-padded to the width of `a`,
/// `{x,y}` lists alternatives. A pattern that then contains `*`, `?` or `[` is a glob (sorted
/// matches; matching nothing is an error); anything else is taken as a path.
///
/// ```
/// let v = m3ae_data::expand_shards("s/{00008..00011}.tar::t/{a,b}.tar")?;
/// let v: Vec<String> = v.iter().map(|p| p.display().to_string()).collect();
/// assert_eq!(v, ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar", "t/a.tar", "t/b.tar"]);
/// # Ok::<(), m3ae_data::Error>(())
/// ```
pub fn expand_shards(spec: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for pat in spec.split("::").map(str::trim).filter(|s| !s.is_empty()) {
        for p in expand_braces(pat)? {
            if p.contains(['*', '?', '[']) {
                let mut matches = Vec::new();
                let paths = glob::glob(&p).map_err(|e| Error::Shards {
                    pattern: p.clone(),
                    msg: e.to_string(),
                })?;
                for m in paths {
                    matches.push(m.map_err(|e| Error::Shards {
                        pattern: p.clone(),
                        msg: e.to_string(),
                    })?);
                }
                if matches.is_empty() {
                    return Err(Error::Shards {
                        pattern: p,
                        msg: "matches no file".into(),
                    });
                }
                matches.sort();
                out.extend(matches);
            } else {
                out.push(PathBuf::from(p));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::Shards {
            pattern: spec.into(),
            msg: "names no shard".into(),
        });
    }
    Ok(out)
}

fn expand_braces(pat: &str) -> Result<Vec<String>> {
    let Some(open) = pat.find('{') else {
        return Ok(vec![pat.to_string()]);
    };
    let err = |msg: &str| Error::Shards {
        pattern: pat.into(),
        msg: msg.into(),
    };
    let close = pat[open..]
        .find('}')
        .map(|c| c + open)
        .ok_or_else(|| err("unclosed `{`"))?;
    let (head, body, tail) = (&pat[..open], &pat[open + 1..close], &pat[close + 1..]);
    let items: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let lo: u64 = a.trim().parse().map_err(|_| err("bad range start"))?;
        let hi: u64 = b.trim().parse().map_err(|_| err("bad range end"))?;
        if hi < lo {
            return Err(err("range end below start"));
        }
        if hi - lo > 10_000_000 {
            return Err(err("range too large"));
        }
        let width = a.trim().len();
        (lo..=hi).map(|i| format!("{i:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    let rests = expand_braces(tail)?;
    let mut out = Vec::with_capacity(items.len() * rests.len());
    for it in &items {
        for rest in &rests {
            out.push(format!("{head}{it}{rest}"));
        }
    }
    Ok(out)
}

/// How a partition reads a list of shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// Shards this partition opens, in order.
    pub shards: Vec<PathBuf>,
    /// `Some((p, n))`: the partition keeps only the samples whose running index over its shards
    /// is `p mod n` (used when there are fewer shards than partitions, so that every partition
    /// reads every shard but keeps a disjoint subset).
    pub sample_split: Option<(usize, usize)>,
}

/// Shards of `partition`: the list is shuffled with (seed, epoch) when `shuffle` is set (the
/// same permutation on every rank), then shard `i` goes to partition `i mod n`. With fewer
/// shards than partitions every partition reads all shards and keeps every n-th sample.
///
/// ```
/// use m3ae_data::{Partition, shards::plan_shards};
/// let shards: Vec<std::path::PathBuf> = (0..5).map(|i| format!("{i}.tar").into()).collect();
/// let p = Partition { rank: 1, world_size: 2, worker: 0, num_workers: 1, seed: 0, epoch: 0 };
/// let plan = plan_shards(&shards, &p, false);
/// assert_eq!(plan.shards, vec![std::path::PathBuf::from("1.tar"), "3.tar".into()]);
/// assert_eq!(plan.sample_split, None);
/// ```
pub fn plan_shards(shards: &[PathBuf], partition: &Partition, shuffle: bool) -> ShardPlan {
    let mut order: Vec<PathBuf> = shards.to_vec();
    if shuffle {
        let mut rng = seed::rng(partition.seed, purpose::SHARDS, partition.epoch, 0);
        order.shuffle(&mut rng);
    }
    let (p, n) = partition.index_and_count();
    if order.len() >= n {
        ShardPlan {
            shards: order
                .into_iter()
                .enumerate()
                .filter(|(i, _)| i % n == p)
                .map(|(_, s)| s)
                .collect(),
            sample_split: None,
        }
    } else {
        ShardPlan {
            shards: order,
            sample_split: Some((p, n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_nested_and_errors() {
        let v = expand_braces("a{0..1}b{x,y}").unwrap();
        assert_eq!(v, ["a0bx", "a0by", "a1bx", "a1by"]);
        assert!(expand_braces("a{3..1}").is_err());
        assert!(expand_braces("a{1..").is_err());
        assert!(expand_braces("a{x..1}").is_err());
        assert!(expand_shards("").is_err());
        assert!(expand_shards("/nonexistent-dir-m3ae/*.tar").is_err());
    }

    #[test]
    fn plans_cover_every_shard_once() {
        let shards: Vec<PathBuf> = (0..7).map(|i| format!("{i}.tar").into()).collect();
        let mut seen = Vec::new();
        for rank in 0..2 {
            for worker in 0..2 {
                let p = Partition {
                    rank,
                    world_size: 2,
                    worker,
                    num_workers: 2,
                    seed: 3,
                    epoch: 1,
                };
                let plan = plan_shards(&shards, &p, true);
                assert!(plan.sample_split.is_none());
                seen.extend(plan.shards);
            }
        }
        seen.sort();
        let mut want = shards.clone();
        want.sort();
        assert_eq!(seen, want);
    }
}
