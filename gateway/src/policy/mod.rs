//! Use-case policy: what a prompt is for, and whether this key may ask it.
//!
//! Every prompt is classified into one of the InstructGPT paper's use-case
//! categories and checked for the high-stakes domains its deployment policy
//! keeps to approved customers. [`Policy::check`] refuses a domain the key
//! is not approved for, then a category the key is not allowed; refusals
//! are recorded by [`AuditLog`], which also tells the caller when a key has
//! been refused often enough to be suspended.

mod audit;
mod classifier;
mod rules;
mod use_case;

use std::sync::Arc;

pub use audit::{AUDIT_MAXLEN, AuditLog, REFUSALS_PREFIX};
pub use classifier::{Classification, INSTRUCTION_CHARS, RuleClassifier, UseCaseClassifier};
pub use rules::PolicyError;
pub use use_case::{Domain, UseCase};

/// What a key is allowed (the key store fills this from the key record).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyPolicy<'a> {
    /// Categories the key may use; empty allows all.
    pub allowed_use_cases: &'a [UseCase],
    /// High-stakes domains the key has been approved for; empty approves none.
    pub approved_domains: &'a [Domain],
}

/// Why a prompt was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// `allowed` is the key's list, so the message can name it.
    UseCaseNotAllowed {
        use_case: UseCase,
        allowed: Vec<UseCase>,
    },
    HighStakesDomain {
        domain: Domain,
    },
}

impl Refusal {
    /// The sentence the client reads in the error body.
    pub fn message(&self) -> String {
        match self {
            Refusal::UseCaseNotAllowed { use_case, allowed } => {
                let allowed: Vec<&str> = allowed.iter().map(|u| u.as_str()).collect();
                format!(
                    "This request was classified as use case '{use_case}', which this API key is not approved for \
                     (allowed: {}). If the classification is wrong, declare the intended use case in the \
                     X-Use-Case header.",
                    allowed.join(", ")
                )
            }
            Refusal::HighStakesDomain { domain } => format!(
                "This request appears to involve {} (high-stakes domain '{domain}'). This API key must be approved \
                 for the '{domain}' domain before it can make such requests; contact your administrator.",
                domain.label()
            ),
        }
    }

    /// The OpenAI-style error code: one for both, as clients handle them alike.
    pub fn code(&self) -> &'static str {
        "use_case_not_allowed"
    }
}

/// Classifies prompts and applies a key's permissions to the result.
pub struct Policy {
    classifier: Arc<dyn UseCaseClassifier>,
}

impl Policy {
    pub fn new(classifier: Arc<dyn UseCaseClassifier>) -> Self {
        Self { classifier }
    }

    /// Classifies and decides. Ok carries the classification (the gateway
    /// logs/uses the category); a refusal carries it too, for the audit log.
    /// Domains come first: a high-stakes request is refused even for a key
    /// allowed every category.
    pub fn check(
        &self,
        prompt: &str,
        declared: Option<UseCase>,
        key: &KeyPolicy,
    ) -> Result<Classification, (Classification, Refusal)> {
        let classification = self.classifier.classify(prompt, declared);
        if let Some(&domain) = classification.domains.iter().find(|d| !key.approved_domains.contains(d)) {
            return Err((classification, Refusal::HighStakesDomain { domain }));
        }
        if !key.allowed_use_cases.is_empty() && !key.allowed_use_cases.contains(&classification.use_case) {
            let refusal = Refusal::UseCaseNotAllowed {
                use_case: classification.use_case,
                allowed: key.allowed_use_cases.to_vec(),
            };
            return Err((classification, refusal));
        }
        Ok(classification)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers a fixed classification, so these tests test the decision only.
    struct Fixed(Classification);

    impl UseCaseClassifier for Fixed {
        fn classify(&self, _prompt: &str, _declared: Option<UseCase>) -> Classification {
            self.0.clone()
        }
    }

    fn policy(use_case: UseCase, domains: &[Domain]) -> Policy {
        Policy::new(Arc::new(Fixed(Classification { use_case, domains: domains.to_vec(), declared_accepted: None })))
    }

    #[test]
    fn allowed_use_cases_are_enforced() {
        let allowed = [UseCase::OpenQa, UseCase::Chat];
        let key = KeyPolicy { allowed_use_cases: &allowed, approved_domains: &[] };
        assert_eq!(policy(UseCase::Chat, &[]).check("hi", None, &key).unwrap().use_case, UseCase::Chat);
        let (classification, refusal) = policy(UseCase::Generation, &[]).check("x", None, &key).unwrap_err();
        assert_eq!(classification.use_case, UseCase::Generation);
        assert_eq!(refusal, Refusal::UseCaseNotAllowed { use_case: UseCase::Generation, allowed: allowed.to_vec() });
        let message = refusal.message();
        assert!(message.contains("'generation'") && message.contains("open_qa, chat"), "{message}");
        assert_eq!(refusal.code(), "use_case_not_allowed");
        // An empty list allows every category.
        let open = KeyPolicy::default();
        assert!(policy(UseCase::Extraction, &[]).check("x", None, &open).is_ok());
    }

    #[test]
    fn high_stakes_domains_need_approval() {
        let medical = policy(UseCase::OpenQa, &[Domain::MedicalDiagnosis]);
        let (_, refusal) = medical.check("x", None, &KeyPolicy::default()).unwrap_err();
        assert_eq!(refusal, Refusal::HighStakesDomain { domain: Domain::MedicalDiagnosis });
        let message = refusal.message();
        assert!(message.contains("medical diagnosis") && message.contains("must be approved"), "{message}");
        assert_eq!(refusal.code(), "use_case_not_allowed");

        let approved = [Domain::MedicalDiagnosis];
        let key = KeyPolicy { allowed_use_cases: &[], approved_domains: &approved };
        assert_eq!(medical.check("x", None, &key).unwrap().domains, approved);

        // Every detected domain must be approved, not just one.
        let two = policy(UseCase::OpenQa, &[Domain::MedicalDiagnosis, Domain::LawEnforcement]);
        let (_, refusal) = two.check("x", None, &key).unwrap_err();
        assert_eq!(refusal, Refusal::HighStakesDomain { domain: Domain::LawEnforcement });
    }

    #[test]
    fn domain_refusal_comes_before_use_case_refusal() {
        let allowed = [UseCase::Chat];
        let key = KeyPolicy { allowed_use_cases: &allowed, approved_domains: &[] };
        let (_, refusal) =
            policy(UseCase::Generation, &[Domain::PoliticalAdvertising]).check("x", None, &key).unwrap_err();
        assert_eq!(refusal, Refusal::HighStakesDomain { domain: Domain::PoliticalAdvertising });
    }

    #[test]
    fn shipped_rules_end_to_end() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/use_cases.toml");
        let policy = Policy::new(Arc::new(RuleClassifier::from_file(std::path::Path::new(path)).unwrap()));
        let allowed = [UseCase::Summarization];
        let key = KeyPolicy { allowed_use_cases: &allowed, approved_domains: &[] };
        assert!(policy.check("Summarize this article: the council met on Tuesday.", None, &key).is_ok());
        let (classification, _) = policy.check("Write a short story about a dragon", None, &key).unwrap_err();
        assert_eq!(classification.use_case, UseCase::Generation);
        let (_, refusal) =
            policy.check("Summarize these resumes and rank these candidates for the job.", None, &key).unwrap_err();
        assert_eq!(refusal, Refusal::HighStakesDomain { domain: Domain::EmploymentEligibility });
    }
}
