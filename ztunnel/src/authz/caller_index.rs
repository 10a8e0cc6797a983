//! Lookup structures over the values policies name their callers by: which of a set of
//! string patterns ([`StrMatch`]) match a value, and which of a set of IP blocks contain an
//! address. Each pattern or block carries an entry (what [`super::policy_set`] files under
//! it); a lookup hands back the entries of every pattern or block that matches, never one
//! that does not, so the caller can take their union as its candidates.
use std::{collections::HashMap, net::IpAddr};

use super::authorization_policy::{IpBlock, StrMatch};

/// String patterns as Istio writes them (exact, `abc*`, `*abc`, `*`), each with an entry.
///
/// Exact values are one hash lookup. Prefixes and suffixes are hashed by their own text and
/// found by trying each length the set has (a workload's policies use few distinct
/// lengths), so a lookup costs one hash probe per distinct length, whatever the number of
/// patterns.
#[derive(Debug)]
pub struct StrIndex<T> {
    exact: HashMap<Box<[u8]>, T>,
    prefixes: HashMap<Box<[u8]>, T>,
    /// The distinct lengths of `prefixes`, ascending.
    prefix_lens: Vec<usize>,
    suffixes: HashMap<Box<[u8]>, T>,
    suffix_lens: Vec<usize>,
    /// `*`: any non-empty value.
    presence: Option<T>,
}

impl<T> Default for StrIndex<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            prefixes: HashMap::new(),
            prefix_lens: Vec::new(),
            suffixes: HashMap::new(),
            suffix_lens: Vec::new(),
            presence: None,
        }
    }
}

fn add_len(lens: &mut Vec<usize>, len: usize) {
    if let Err(at) = lens.binary_search(&len) {
        lens.insert(at, len);
    }
}

impl<T: Default> StrIndex<T> {
    /// The entry of `pattern`, created empty if new.
    pub fn entry(&mut self, pattern: &StrMatch) -> &mut T {
        let key = |s: &str| Box::<[u8]>::from(s.as_bytes());
        match pattern {
            StrMatch::Exact(s) => self.exact.entry(key(s)).or_default(),
            StrMatch::Prefix(s) => {
                add_len(&mut self.prefix_lens, s.len());
                self.prefixes.entry(key(s)).or_default()
            }
            StrMatch::Suffix(s) => {
                add_len(&mut self.suffix_lens, s.len());
                self.suffixes.entry(key(s)).or_default()
            }
            StrMatch::Presence => self.presence.get_or_insert_with(T::default),
        }
    }
}

impl<T> StrIndex<T> {
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
            && self.prefixes.is_empty()
            && self.suffixes.is_empty()
            && self.presence.is_none()
    }

    /// Calls `found` with the entry of every pattern that matches `value` (as
    /// [`StrMatch::matches`] decides).
    pub fn lookup<'a>(&'a self, value: &str, mut found: impl FnMut(&'a T)) {
        let v = value.as_bytes();
        if let Some(t) = self.exact.get(v) {
            found(t);
        }
        for &len in self.prefix_lens.iter().take_while(|l| **l <= v.len()) {
            if let Some(t) = self.prefixes.get(&v[..len]) {
                found(t);
            }
        }
        for &len in self.suffix_lens.iter().take_while(|l| **l <= v.len()) {
            if let Some(t) = self.suffixes.get(&v[v.len() - len..]) {
                found(t);
            }
        }
        if let Some(t) = self.presence.as_ref().filter(|_| !v.is_empty()) {
            found(t);
        }
    }
}

/// IP blocks (IPv4 and IPv6 CIDRs), each with an entry: a binary trie per family, walked
/// along the address's bits, so a lookup costs at most 33 (IPv4) or 129 (IPv6) steps.
#[derive(Debug)]
pub struct IpIndex<T> {
    v4: BitTrie,
    v6: BitTrie,
    entries: Vec<T>,
}

impl<T> Default for IpIndex<T> {
    fn default() -> Self {
        Self {
            v4: BitTrie::default(),
            v6: BitTrie::default(),
            entries: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
struct BitTrie {
    /// Node 0 is the root (the /0 block) once anything is inserted.
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Clone, Copy, Default)]
struct TrieNode {
    /// Child node for bit 0 and bit 1; 0 is none (the root is never a child).
    child: [u32; 2],
    /// Index in `IpIndex::entries` + 1; 0 is none.
    entry: u32,
}

fn bit(octets: &[u8], i: usize) -> usize {
    ((octets[i / 8] >> (7 - i % 8)) & 1) as usize
}

impl BitTrie {
    /// The node of the block `octets`/`prefix`, created if new.
    fn node(&mut self, octets: &[u8], prefix: u8) -> usize {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut at = 0;
        for i in 0..prefix as usize {
            let b = bit(octets, i);
            at = match self.nodes[at].child[b] {
                0 => {
                    self.nodes.push(TrieNode::default());
                    let new = self.nodes.len() - 1;
                    self.nodes[at].child[b] = new as u32;
                    new
                }
                next => next as usize,
            };
        }
        at
    }

    /// The entries of every block on the path to `octets`, shortest block first.
    fn walk(&self, octets: &[u8], mut found: impl FnMut(usize)) {
        if self.nodes.is_empty() {
            return;
        }
        let mut at = 0;
        for i in 0..=octets.len() * 8 {
            let node = self.nodes[at];
            if node.entry != 0 {
                found(node.entry as usize - 1);
            }
            if i == octets.len() * 8 {
                break;
            }
            match node.child[bit(octets, i)] {
                0 => break,
                next => at = next as usize,
            }
        }
    }
}

impl<T: Default> IpIndex<T> {
    /// The entry of `block`, created empty if new.
    pub fn entry(&mut self, block: &IpBlock) -> &mut T {
        let node = match block.addr {
            IpAddr::V4(a) => {
                let n = self.v4.node(&a.octets(), block.prefix);
                &mut self.v4.nodes[n]
            }
            IpAddr::V6(a) => {
                let n = self.v6.node(&a.octets(), block.prefix);
                &mut self.v6.nodes[n]
            }
        };
        if node.entry == 0 {
            self.entries.push(T::default());
            node.entry = self.entries.len() as u32;
        }
        let at = node.entry as usize - 1;
        &mut self.entries[at]
    }
}

impl<T> IpIndex<T> {
    /// Calls `found` with the entry of every block that contains `ip` (as
    /// [`IpBlock::contains`] decides: an IPv4 block also contains the IPv4-mapped IPv6 form).
    pub fn lookup<'a>(&'a self, ip: IpAddr, mut found: impl FnMut(&'a T)) {
        let mut each = |i: usize| found(&self.entries[i]);
        match ip {
            IpAddr::V4(a) => self.v4.walk(&a.octets(), &mut each),
            IpAddr::V6(a) => {
                self.v6.walk(&a.octets(), &mut each);
                if let Some(v4) = a.to_ipv4_mapped() {
                    self.v4.walk(&v4.octets(), &mut each);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found_str(index: &StrIndex<Vec<&'static str>>, value: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        index.lookup(value, |t| out.extend(t.iter().copied()));
        out.sort();
        out
    }

    /// A lookup finds exactly the patterns [`StrMatch::matches`] accepts.
    #[test]
    fn string_lookups_agree_with_matching() {
        let patterns = [
            "cluster.local/ns/a/sa/b",
            "cluster.local/ns/a/*",
            "cluster.local/*",
            "*/sa/b",
            "*b",
            "*",
            "",
            "a*",
            "*a",
            "**",
        ];
        let mut index = StrIndex::<Vec<&'static str>>::default();
        for p in patterns {
            index.entry(&StrMatch::parse(p)).push(p);
        }
        for value in [
            "cluster.local/ns/a/sa/b",
            "cluster.local/ns/a/sa/c",
            "cluster.local",
            "other/sa/b",
            "a",
            "b",
            "",
            "*",
            "é*",
            "x**",
        ] {
            let mut expected: Vec<&str> = patterns
                .iter()
                .copied()
                .filter(|p| StrMatch::parse(p).matches(value))
                .collect();
            expected.sort();
            assert_eq!(found_str(&index, value), expected, "{value:?}");
        }
    }

    /// A lookup finds exactly the blocks [`IpBlock::contains`] accepts, IPv4-mapped included.
    #[test]
    fn ip_lookups_agree_with_contains() {
        let blocks = [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "10.1.2.3",
            "10.1.2.3/32",
            "10.1.3.0/25",
            "::/0",
            "fd00::/8",
            "fd00::1",
            "::ffff:10.1.0.0/112",
        ];
        let mut index = IpIndex::<Vec<&'static str>>::default();
        for b in blocks {
            index.entry(&IpBlock::parse(b).unwrap()).push(b);
        }
        for ip in [
            "10.1.2.3",
            "10.1.2.4",
            "10.1.3.127",
            "10.1.3.128",
            "10.9.9.9",
            "192.168.0.1",
            "fd00::1",
            "fd00::2",
            "fe80::1",
            "::ffff:10.1.2.3",
            "::ffff:192.168.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut got = Vec::new();
            index.lookup(ip, |t| got.extend(t.iter().copied()));
            got.sort();
            let mut expected: Vec<&str> = blocks
                .iter()
                .copied()
                .filter(|b| IpBlock::parse(b).unwrap().contains(ip))
                .collect();
            expected.sort();
            assert_eq!(got, expected, "{ip}");
        }
    }
}
