//! The AuthorizationPolicies of one workload, arranged so that a decision looks only at the
//! rules the caller could match.
//!
//! Most rules name their callers: `from: [{source: {principals: [...]}}]` with exact
//! principals. Such a rule cannot match a peer whose principal is not in that list, at L4 or
//! at L7, so it is filed under each of its principals and never looked at for other peers.
//! Every other rule is "open" and looked at for every call. The rules a call could match are
//! the open ones plus those filed under its principal, merged back into the policies' order,
//! so the first matching policy and rule are exactly those a full scan would report.
use std::{collections::HashMap, iter::Peekable, sync::Arc};

use super::{
    authorization_policy::{Action, AuthorizationPolicy, Source, StrMatch},
    matching::{rule_matches, Attributes, Tri},
};

/// A workload's policies, in evaluation order: AUDIT, CUSTOM, DENY, ALLOW, and within an
/// action in the order given (Istio's: oldest first, then by name).
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: Vec<Arc<AuthorizationPolicy>>,
    /// Rules any caller may match, in (policy, rule) order.
    open: Vec<RuleRef>,
    /// Rules only callers with one of their exact principals may match, in (policy, rule)
    /// order under each principal.
    by_principal: HashMap<String, Vec<RuleRef>>,
    has_allow: bool,
}

/// A rule: `policies[policy].rules[rule]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RuleRef {
    policy: u32,
    rule: u32,
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

/// The exact principals a source requires, if it requires one of them (a source with no
/// principals, or with a pattern among them, may match any caller).
fn required_principals(source: &Source) -> Option<impl Iterator<Item = &str>> {
    let any_of = &source.principals.any_of;
    let exact = !any_of.is_empty() && any_of.iter().all(|m| matches!(m, StrMatch::Exact(_)));
    exact.then(|| {
        any_of.iter().filter_map(|m| match m {
            StrMatch::Exact(p) => Some(p.as_str()),
            _ => None,
        })
    })
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
                // Indexable when every source of `from` requires exact principals (an empty
                // `from` does not constrain the caller).
                let sources: Option<Vec<_>> = rule.from.iter().map(required_principals).collect();
                match sources {
                    Some(sources) if index && !sources.is_empty() => {
                        for principal in sources.into_iter().flatten() {
                            let list = set.by_principal.entry(principal.to_owned()).or_default();
                            // Several sources may name the same principal: file the rule once.
                            if list.last() != Some(&at) {
                                list.push(at);
                            }
                        }
                    }
                    _ => set.open.push(at),
                }
            }
        }
        set.policies = policies;
        set
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Whether any ALLOW policy applies (then a call no ALLOW rule matches is denied).
    pub fn has_allow(&self) -> bool {
        self.has_allow
    }

    /// The policies `a` matches or may match, in evaluation order.
    pub fn matches<'a>(&'a self, a: &'a Attributes) -> impl Iterator<Item = PolicyMatch<'a>> {
        let named = a
            .source_principal
            .as_deref()
            .and_then(|p| self.by_principal.get(p))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        Grouped {
            set: self,
            attributes: a,
            rules: merge(&self.open, named).peekable(),
        }
    }
}

/// Two (policy, rule)-ordered lists without common items, as one ordered sequence.
fn merge<'a>(a: &'a [RuleRef], b: &'a [RuleRef]) -> impl Iterator<Item = RuleRef> + 'a {
    let (mut i, mut j) = (0, 0);
    std::iter::from_fn(move || {
        let next = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x < y => x,
            (Some(_), Some(y)) | (None, Some(y)) => {
                j += 1;
                return Some(*y);
            }
            (Some(x), None) => x,
            (None, None) => return None,
        };
        i += 1;
        Some(*next)
    })
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
        assert_eq!(set.by_principal["cluster.local/ns/shop/sa/a"].len(), 2);
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
