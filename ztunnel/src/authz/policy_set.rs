//! The AuthorizationPolicies of one workload, arranged so that a decision looks only at the
//! rules the caller could match.
//!
//! Most rules name their callers: `from: [{source: {principals: [...]}}]`, by exact principal
//! or pattern, or by namespace, service account or IP block. A source that requires one of
//! some values of a caller attribute cannot match a caller whose value matches none of them,
//! at L4 or at L7, so its rule is filed under those values (exact values hashed, `*`-patterns
//! by prefix or suffix, blocks in a bit trie: [`super::caller_index`]) and looked at only for
//! callers whose value matches one. A source that only *excludes* values of an attribute
//! (`notNamespaces: [...]`, `notIpBlocks: [...]`) is "sparing": a candidate for every caller
//! except those its values exclude, which a lookup finds as runs of the sparing list to skip.
//! A rule with any source that constrains none of these (or with no `from`) is "open" and
//! looked at for every call.
//!
//! The rules a call could match are the open ones, those filed under values its attributes
//! match, and the sparing ones it is not excluded from, merged back into (policy, rule)
//! order, so the first matching policy and rule are exactly those a full scan would report.
use std::{iter::Peekable, net::IpAddr, sync::Arc};

use smallvec::SmallVec;

use super::{
    authorization_policy::{Action, AuthorizationPolicy, IpBlock, Source, StrMatch, Values},
    caller_index::{IpIndex, StrIndex},
    matching::{rule_matches, Attributes, Tri},
};

/// A workload's policies, in evaluation order: AUDIT, CUSTOM, DENY, ALLOW, and within an
/// action in the order given (Istio's: oldest first, then by name).
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: Vec<Arc<AuthorizationPolicy>>,
    /// Rules any caller may match, in (policy, rule) order.
    open: Vec<RuleRef>,
    principals: Filed<StrIndex<Vec<RuleRef>>, StrIndex<Runs>>,
    namespaces: Filed<StrIndex<Vec<RuleRef>>, StrIndex<Runs>>,
    /// `serviceAccounts` (`namespace/name`, from the principal).
    service_accounts: Filed<StrIndex<Vec<RuleRef>>, StrIndex<Runs>>,
    source_ips: Filed<IpIndex<Vec<RuleRef>>, IpIndex<Runs>>,
    remote_ips: Filed<IpIndex<Vec<RuleRef>>, IpIndex<Runs>>,
    has_allow: bool,
}

/// A rule: `policies[policy].rules[rule]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RuleRef {
    policy: u32,
    rule: u32,
}

/// The rules filed by one caller attribute.
#[derive(Debug, Default)]
struct Filed<R, X> {
    /// Under each value: the rules one of whose sources requires it, in (policy, rule) order.
    required: R,
    /// One entry per sparing source, in (policy, rule) order (a rule with two sparing
    /// sources is there twice).
    sparing: Vec<RuleRef>,
    /// Under each value: the positions in `sparing` of the sources that exclude it.
    excluded: X,
}

/// Sorted, disjoint, non-adjacent runs of positions `[start, end)`.
#[derive(Debug, Default)]
struct Runs(Vec<(u32, u32)>);

impl Runs {
    /// Adds `at`, which is not below any position added before.
    fn push(&mut self, at: u32) {
        match self.0.last_mut() {
            Some((_, end)) if *end > at => {}
            Some((_, end)) if *end == at => *end = at + 1,
            _ => self.0.push((at, at + 1)),
        }
    }

    /// The union of several run lists.
    fn union(lists: &[&Runs]) -> Runs {
        let mut all: Vec<(u32, u32)> = lists.iter().flat_map(|r| r.0.iter().copied()).collect();
        all.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(all.len());
        for (start, end) in all {
            match out.last_mut() {
                Some((_, last)) if *last >= start => *last = (*last).max(end),
                _ => out.push((start, end)),
            }
        }
        Runs(out)
    }
}

/// What a policy that may match a call matched: `Yes` with its first matching rule, or
/// `Unknown` (a rule depends on HTTP attributes not known yet). Policies that cannot match
/// are not reported.
pub struct PolicyMatch<'a> {
    pub policy: &'a AuthorizationPolicy,
    pub matched: Tri,
    pub rule: Option<usize>,
}

fn rank(action: Action) -> u8 {
    match action {
        Action::Audit => 0,
        Action::Custom => 1,
        Action::Deny => 2,
        Action::Allow => 3,
    }
}

/// Where a source is filed: the first that applies of a required string attribute without
/// the bare `*` among its values (which every mTLS peer matches), a required IP block, a
/// required string attribute with `*`, an attribute the source only excludes values of (a
/// string one first); else nowhere (the rule is open).
enum Filing<'s> {
    RequiredStr(StrAttr, &'s [StrMatch]),
    RequiredIp(IpAttr, &'s [IpBlock]),
    SparingStr(StrAttr, &'s [StrMatch]),
    SparingIp(IpAttr, &'s [IpBlock]),
    Open,
}

#[derive(Clone, Copy)]
enum StrAttr {
    Principal,
    Namespace,
    ServiceAccount,
}

#[derive(Clone, Copy)]
enum IpAttr {
    Source,
    Remote,
}

fn filing(s: &Source) -> Filing<'_> {
    let strs = [
        (StrAttr::Principal, &s.principals),
        (StrAttr::Namespace, &s.namespaces),
        (StrAttr::ServiceAccount, &s.service_accounts),
    ];
    let ips = [
        (IpAttr::Source, &s.ip_blocks),
        (IpAttr::Remote, &s.remote_ip_blocks),
    ];
    let selective =
        |v: &Values<StrMatch>| !v.any_of.is_empty() && !v.any_of.contains(&StrMatch::Presence);
    if let Some((a, v)) = strs.iter().find(|(_, v)| selective(v)) {
        return Filing::RequiredStr(*a, &v.any_of);
    }
    if let Some((a, v)) = ips.iter().find(|(_, v)| !v.any_of.is_empty()) {
        return Filing::RequiredIp(*a, &v.any_of);
    }
    if let Some((a, v)) = strs.iter().find(|(_, v)| !v.any_of.is_empty()) {
        return Filing::RequiredStr(*a, &v.any_of);
    }
    // Nothing is required of the caller's identity or address: what it must not be decides.
    if let Some((a, v)) = strs.iter().find(|(_, v)| !v.none_of.is_empty()) {
        return Filing::SparingStr(*a, &v.none_of);
    }
    if let Some((a, v)) = ips.iter().find(|(_, v)| !v.none_of.is_empty()) {
        return Filing::SparingIp(*a, &v.none_of);
    }
    Filing::Open
}

/// Files `at` in `list` unless it is there already (several sources may name one value).
fn require(list: &mut Vec<RuleRef>, at: RuleRef) {
    if list.last() != Some(&at) {
        list.push(at);
    }
}

impl PolicySet {
    pub fn new(policies: impl IntoIterator<Item = Arc<AuthorizationPolicy>>) -> Self {
        Self::build(policies, true)
    }

    /// Every rule open: the full scan the index must agree with, for the fuzz target that
    /// compares the two on arbitrary policies.
    #[doc(hidden)]
    pub fn unindexed(policies: impl IntoIterator<Item = Arc<AuthorizationPolicy>>) -> Self {
        Self::build(policies, false)
    }

    /// With `index` false every rule is open: the full scan the index must agree with (a test
    /// of `evaluate` compares the two).
    fn build(policies: impl IntoIterator<Item = Arc<AuthorizationPolicy>>, index: bool) -> Self {
        let mut policies: Vec<_> = policies.into_iter().collect();
        // Stable: the given order stays within an action.
        policies.sort_by_key(|p| rank(p.action));
        let mut set = PolicySet {
            has_allow: policies.iter().any(|p| p.action == Action::Allow),
            ..Default::default()
        };
        for (pi, policy) in policies.iter().enumerate() {
            for (ri, rule) in policy.rules.iter().enumerate() {
                let at = RuleRef {
                    policy: pi as u32,
                    rule: ri as u32,
                };
                // An empty `from` does not constrain the caller; one open source opens the rule.
                let filings: Vec<Filing> = rule.from.iter().map(filing).collect();
                let open = !index
                    || filings.is_empty()
                    || filings.iter().any(|f| matches!(f, Filing::Open));
                if open {
                    set.open.push(at);
                    continue;
                }
                for f in filings {
                    set.file(f, at);
                }
            }
        }
        set.policies = policies;
        set
    }

    fn str_filed(&mut self, a: StrAttr) -> &mut Filed<StrIndex<Vec<RuleRef>>, StrIndex<Runs>> {
        match a {
            StrAttr::Principal => &mut self.principals,
            StrAttr::Namespace => &mut self.namespaces,
            StrAttr::ServiceAccount => &mut self.service_accounts,
        }
    }

    fn ip_filed(&mut self, a: IpAttr) -> &mut Filed<IpIndex<Vec<RuleRef>>, IpIndex<Runs>> {
        match a {
            IpAttr::Source => &mut self.source_ips,
            IpAttr::Remote => &mut self.remote_ips,
        }
    }

    fn file(&mut self, f: Filing, at: RuleRef) {
        match f {
            Filing::RequiredStr(a, values) => {
                let filed = self.str_filed(a);
                for m in values {
                    require(filed.required.entry(m), at);
                }
            }
            Filing::RequiredIp(a, values) => {
                let filed = self.ip_filed(a);
                for b in values {
                    require(filed.required.entry(b), at);
                }
            }
            Filing::SparingStr(a, values) => {
                let filed = self.str_filed(a);
                let pos = filed.sparing.len() as u32;
                filed.sparing.push(at);
                for m in values {
                    filed.excluded.entry(m).push(pos);
                }
            }
            Filing::SparingIp(a, values) => {
                let filed = self.ip_filed(a);
                let pos = filed.sparing.len() as u32;
                filed.sparing.push(at);
                for b in values {
                    filed.excluded.entry(b).push(pos);
                }
            }
            Filing::Open => unreachable!("open rules are not filed"),
        }
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies, in evaluation order.
    pub fn policies(&self) -> &[Arc<AuthorizationPolicy>] {
        &self.policies
    }

    /// Whether any ALLOW policy applies (then a call no ALLOW rule matches is denied).
    pub fn has_allow(&self) -> bool {
        self.has_allow
    }

    /// The policies `a` matches or may match, in evaluation order.
    pub fn matches<'a>(&'a self, a: &'a Attributes) -> impl Iterator<Item = PolicyMatch<'a>> {
        Grouped {
            set: self,
            attributes: a,
            rules: self.candidates(a).peekable(),
        }
    }

    /// The rules `a` could match, once each, in (policy, rule) order: the open ones, those
    /// filed under values `a` has, and the sparing ones that do not exclude `a`.
    fn candidates(&self, a: &Attributes) -> Streams<'_> {
        let mut streams = Streams::default();
        streams.add_rules(&self.open);
        streams.add_str(&self.principals, a.source_principal.as_deref());
        streams.add_str(&self.namespaces, a.source_namespace.as_deref());
        if !(self.service_accounts.required.is_empty() && self.service_accounts.sparing.is_empty())
        {
            let sa = a
                .source_principal
                .as_deref()
                .and_then(super::matching::service_account);
            streams.add_str(&self.service_accounts, sa.as_deref());
        }
        streams.add_ip(&self.source_ips, a.source_ip);
        streams.add_ip(&self.remote_ips, a.remote_ip);
        streams
    }
}

/// Where candidates come from: (policy, rule)-ordered lists, merged.
#[derive(Default)]
struct Streams<'a> {
    streams: SmallVec<[Stream<'a>; 6]>,
}

/// One (policy, rule)-ordered source of candidates.
enum Stream<'a> {
    Rules(&'a [RuleRef]),
    /// `entries` from `at` on, without the positions `excluded` lists.
    Sparing {
        entries: &'a [RuleRef],
        at: usize,
        excluded: Excluded<'a>,
        run: usize,
    },
}

enum Excluded<'a> {
    Borrowed(&'a [(u32, u32)]),
    Owned(Runs),
}

impl Excluded<'_> {
    fn runs(&self) -> &[(u32, u32)] {
        match self {
            Excluded::Borrowed(r) => r,
            Excluded::Owned(r) => &r.0,
        }
    }
}

impl Stream<'_> {
    fn head(&self) -> Option<RuleRef> {
        match self {
            Stream::Rules(r) => r.first().copied(),
            Stream::Sparing { entries, at, .. } => entries.get(*at).copied(),
        }
    }

    /// Moves past the excluded positions at the head.
    fn settle(&mut self) {
        if let Stream::Sparing {
            at, excluded, run, ..
        } = self
        {
            let runs = excluded.runs();
            while let Some(&(start, end)) = runs.get(*run) {
                if end as usize <= *at {
                    *run += 1;
                } else if start as usize <= *at {
                    *at = end as usize;
                    *run += 1;
                } else {
                    break;
                }
            }
        }
    }

    fn advance(&mut self) {
        match self {
            Stream::Rules(r) => *r = &r[1..],
            Stream::Sparing { at, .. } => *at += 1,
        }
        self.settle();
    }
}

impl<'a> Streams<'a> {
    fn add_rules(&mut self, rules: &'a [RuleRef]) {
        if !rules.is_empty() {
            self.streams.push(Stream::Rules(rules));
        }
    }

    fn add_sparing(&mut self, entries: &'a [RuleRef], excluded: SmallVec<[&'a Runs; 2]>) {
        if entries.is_empty() {
            return;
        }
        let excluded = match excluded.as_slice() {
            [] => Excluded::Borrowed(&[]),
            [one] => Excluded::Borrowed(&one.0),
            many => Excluded::Owned(Runs::union(many)),
        };
        let mut stream = Stream::Sparing {
            entries,
            at: 0,
            excluded,
            run: 0,
        };
        stream.settle();
        self.streams.push(stream);
    }

    fn add_str(
        &mut self,
        filed: &'a Filed<StrIndex<Vec<RuleRef>>, StrIndex<Runs>>,
        value: Option<&str>,
    ) {
        let mut excluded = SmallVec::new();
        if let Some(v) = value {
            filed.required.lookup(v, |rules| self.add_rules(rules));
            filed.excluded.lookup(v, |runs| excluded.push(runs));
        }
        // No value (a plaintext caller has no principal) is excluded by no `not` list.
        self.add_sparing(&filed.sparing, excluded);
    }

    fn add_ip(
        &mut self,
        filed: &'a Filed<IpIndex<Vec<RuleRef>>, IpIndex<Runs>>,
        ip: Option<IpAddr>,
    ) {
        let mut excluded = SmallVec::new();
        if let Some(ip) = ip {
            filed.required.lookup(ip, |rules| self.add_rules(rules));
            filed.excluded.lookup(ip, |runs| excluded.push(runs));
        }
        self.add_sparing(&filed.sparing, excluded);
    }
}

impl Iterator for Streams<'_> {
    type Item = RuleRef;

    /// The least head, once, however many streams hold it (or how often: a rule with two
    /// sparing sources is twice in one stream).
    fn next(&mut self) -> Option<RuleRef> {
        let least = self.streams.iter().filter_map(Stream::head).min()?;
        for s in &mut self.streams {
            while s.head() == Some(least) {
                s.advance();
            }
        }
        Some(least)
    }
}

/// Candidate rules grouped by policy, each policy's first matching rule found.
struct Grouped<'a, I: Iterator<Item = RuleRef>> {
    set: &'a PolicySet,
    attributes: &'a Attributes,
    rules: Peekable<I>,
}

impl<'a, I: Iterator<Item = RuleRef>> Iterator for Grouped<'a, I> {
    type Item = PolicyMatch<'a>;

    fn next(&mut self) -> Option<PolicyMatch<'a>> {
        loop {
            let first = self.rules.next()?;
            let policy = &self.set.policies[first.policy as usize];
            let mut matched = Tri::No;
            let mut rule = None;
            let mut at = Some(first);
            while let Some(r) = at {
                if matched != Tri::Yes {
                    match rule_matches(&policy.rules[r.rule as usize], self.attributes) {
                        Tri::Yes => {
                            matched = Tri::Yes;
                            rule = Some(r.rule as usize);
                        }
                        Tri::Unknown => matched = Tri::Unknown,
                        Tri::No => {}
                    }
                }
                at = self.rules.next_if(|n| n.policy == first.policy);
            }
            if matched != Tri::No {
                return Some(PolicyMatch {
                    policy,
                    matched,
                    rule,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::authz::authorization_policy::SpecDoc;
    use crate::model::Origin;

    fn policy(name: &str, spec: &str) -> Arc<AuthorizationPolicy> {
        let doc: SpecDoc = serde_yaml::from_str(spec).unwrap();
        Arc::new(
            doc.into_policy("shop".into(), name.into(), Origin::default())
                .unwrap(),
        )
    }

    fn peer(sa: &str) -> Attributes {
        Attributes {
            source_principal: Some(format!("cluster.local/ns/shop/sa/{sa}")),
            source_namespace: Some("shop".into()),
            destination_port: Some(8080),
            ..Default::default()
        }
    }

    fn matched(set: &PolicySet, a: &Attributes) -> Vec<String> {
        set.matches(a)
            .map(|m| format!("{}#{:?}:{:?}", m.policy.name, m.rule, m.matched))
            .collect()
    }

    /// A caller: an mTLS peer `ns`/`sa` (or plaintext with `None`) from `ip`.
    fn caller(peer: Option<(&str, &str)>, ip: &str) -> Attributes {
        let ip: IpAddr = ip.parse().unwrap();
        Attributes {
            source_principal: peer.map(|(ns, sa)| format!("cluster.local/ns/{ns}/sa/{sa}")),
            source_namespace: peer.map(|(ns, _)| ns.to_owned()),
            source_ip: Some(ip),
            remote_ip: Some(ip),
            destination_port: Some(8080),
            ..Default::default()
        }
    }

    fn candidates(set: &PolicySet, a: &Attributes) -> Vec<(u32, u32)> {
        set.candidates(a).map(|r| (r.policy, r.rule)).collect()
    }

    /// Each way a source names or excludes its callers files the rule (it is not open) so
    /// that the callers it may match find it and the others do not.
    #[test]
    fn each_kind_of_source_is_filed_and_found_only_by_callers_it_may_match() {
        let shop_a = caller(Some(("shop", "a")), "10.1.2.3");
        let shop_evil = caller(Some(("shop", "evil")), "10.1.2.3");
        let bank_a = caller(Some(("bank", "a")), "10.2.0.1");
        let bank_b = caller(Some(("bank", "b")), "10.2.0.1");
        let team_eu = caller(Some(("team-eu", "a")), "10.2.0.1");
        let plain_in = caller(None, "10.1.2.3");
        let plain_out = caller(None, "10.2.0.1");
        let mapped_in = caller(None, "::ffff:10.1.2.3");
        let v6_in = caller(None, "fd00::1");
        let mut remote_in = plain_out.clone();
        remote_in.remote_ip = Some("10.1.9.9".parse().unwrap());
        // (source, callers it may match, callers it cannot)
        let table: &[(&str, Vec<&Attributes>, Vec<&Attributes>)] = &[
            (
                "principals: [cluster.local/ns/shop/sa/a]",
                vec![&shop_a],
                vec![&shop_evil, &bank_a, &plain_in],
            ),
            (
                "principals: [\"cluster.local/ns/shop/*\"]",
                vec![&shop_a, &shop_evil],
                vec![&bank_a, &plain_in],
            ),
            (
                "principals: [\"*/sa/a\"]",
                vec![&shop_a, &bank_a, &team_eu],
                vec![&shop_evil, &bank_b, &plain_in],
            ),
            (
                "principals: [\"*\"]",
                vec![&shop_a, &bank_b],
                vec![&plain_in, &plain_out],
            ),
            (
                "namespaces: [bank]",
                vec![&bank_a, &bank_b],
                vec![&shop_a, &plain_out],
            ),
            (
                "namespaces: [\"team-*\"]",
                vec![&team_eu],
                vec![&shop_a, &plain_out],
            ),
            (
                "namespaces: [\"*-eu\"]",
                vec![&team_eu],
                vec![&bank_a, &plain_out],
            ),
            (
                "serviceAccounts: [shop/a]",
                vec![&shop_a],
                vec![&bank_a, &shop_evil, &plain_in],
            ),
            (
                "ipBlocks: [10.1.0.0/16]",
                vec![&shop_a, &plain_in, &mapped_in],
                vec![&bank_a, &plain_out, &v6_in],
            ),
            (
                "ipBlocks: [\"fd00::/8\"]",
                vec![&v6_in],
                vec![&plain_in, &mapped_in],
            ),
            (
                "remoteIpBlocks: [10.1.0.0/16]",
                vec![&remote_in, &plain_in],
                vec![&plain_out],
            ),
            (
                "notPrincipals: [\"*/sa/evil\"]",
                vec![&shop_a, &bank_a, &plain_in],
                vec![&shop_evil],
            ),
            (
                "notNamespaces: [bank]",
                vec![&shop_a, &team_eu, &plain_out],
                vec![&bank_a, &bank_b],
            ),
            (
                "notIpBlocks: [10.1.0.0/16]",
                vec![&bank_a, &plain_out, &v6_in],
                vec![&shop_a, &plain_in, &mapped_in],
            ),
            // Required and excluded in one source: filed by what is required.
            (
                "namespaces: [shop], notPrincipals: [\"*/sa/evil\"]",
                vec![&shop_a, &shop_evil],
                vec![&bank_a, &plain_in],
            ),
        ];
        for (source, may, cannot) in table {
            let set = PolicySet::new([policy(
                "p",
                &format!("rules: [{{from: [{{source: {{{source}}}}}]}}]"),
            )]);
            assert!(set.open.is_empty(), "{source}: the rule is filed");
            for a in may {
                assert_eq!(candidates(&set, a), [(0, 0)], "{source}: {a:?} finds it");
            }
            for a in cannot {
                assert_eq!(candidates(&set, a), [], "{source}: {a:?} does not");
            }
        }
        // A source that constrains no caller attribute opens its rule, and one open source
        // opens the rule whatever the others name.
        for from in [
            "[{source: {requestPrincipals: [\"*\"]}}]",
            "[{source: {namespaces: [bank]}}, {source: {requestPrincipals: [\"*\"]}}]",
        ] {
            let set = PolicySet::new([policy("p", &format!("rules: [{{from: {from}}}]"))]);
            assert_eq!(set.open.len(), 1, "{from}");
            assert_eq!(candidates(&set, &plain_out), [(0, 0)], "{from}");
        }
    }

    /// Candidates from several lists come out once each and in (policy, rule) order: a rule
    /// named by two sources of different kinds, or sparing twice, is one candidate.
    #[test]
    fn candidates_are_merged_in_order_without_repeats() {
        let set = PolicySet::new([
            policy(
                "a",
                "rules:\n- from: [{source: {namespaces: [shop]}}, {source: {ipBlocks: [10.1.0.0/16]}}]\n- from: [{source: {notNamespaces: [bank]}}, {source: {notNamespaces: [team, bank]}}]\n- {}",
            ),
            policy(
                "b",
                "rules: [{from: [{source: {principals: [\"*/sa/a\", \"cluster.local/*\"]}}]}]",
            ),
        ]);
        let shop_a = caller(Some(("shop", "a")), "10.1.2.3");
        assert_eq!(candidates(&set, &shop_a), [(0, 0), (0, 1), (0, 2), (1, 0)]);
        // Excluded by both sparing sources of rule 1; one of them is enough to be found.
        let bank_b = caller(Some(("bank", "b")), "10.2.0.1");
        assert_eq!(candidates(&set, &bank_b), [(0, 2), (1, 0)]);
        let team_b = caller(Some(("team", "b")), "10.2.0.1");
        assert_eq!(candidates(&set, &team_b), [(0, 1), (0, 2), (1, 0)]);
    }

    #[test]
    fn exact_principal_rules_are_found_by_principal_and_order_is_kept() {
        let set = PolicySet::new([
            policy(
                "allow-a",
                "rules:\n- from: [{source: {principals: [cluster.local/ns/shop/sa/b]}}]\n- from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}, {source: {principals: [cluster.local/ns/shop/sa/a]}}]",
            ),
            policy(
                "deny-pattern",
                "action: DENY\nrules: [{from: [{source: {principals: [\"*/sa/a\"]}}], to: [{operation: {paths: [/admin]}}]}]",
            ),
            policy(
                "allow-any",
                "rules: [{to: [{operation: {ports: [\"8080\"]}}]}]",
            ),
            policy("allow-nothing", "{}"),
            policy(
                "audit-a",
                "action: AUDIT\nrules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}]}]",
            ),
        ]);
        assert!(set.has_allow());
        let mut filed = Vec::new();
        set.principals
            .required
            .lookup("cluster.local/ns/shop/sa/a", |r| filed.extend_from_slice(r));
        // Both rules naming sa/a exactly, and the DENY naming `*/sa/a`.
        assert_eq!(filed.len(), 3, "{filed:?}");
        // Evaluation order (AUDIT, DENY, ALLOW) and each policy's first matching rule.
        assert_eq!(
            matched(&set, &peer("a")),
            [
                "audit-a#Some(0):Yes",
                "deny-pattern#None:Unknown",
                "allow-a#Some(1):Yes",
                "allow-any#Some(0):Yes"
            ]
        );
        assert_eq!(
            matched(&set, &peer("b")),
            ["allow-a#Some(0):Yes", "allow-any#Some(0):Yes"]
        );
        // No principal (plaintext): only open rules.
        let plaintext = Attributes {
            destination_port: Some(8080),
            ..Default::default()
        };
        assert_eq!(matched(&set, &plaintext), ["allow-any#Some(0):Yes"]);
    }
}
