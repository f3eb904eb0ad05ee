//! The InstructGPT paper's use-case categories and its high-stakes domains,
//! with the names clients, keys and rule files spell them by.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The ten prompt categories of the InstructGPT paper (Table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UseCase {
    Generation,
    OpenQa,
    ClosedQa,
    Brainstorming,
    Chat,
    Rewrite,
    Summarization,
    Classification,
    Extraction,
    Other,
}

impl UseCase {
    pub const ALL: [UseCase; 10] = [
        UseCase::Generation,
        UseCase::OpenQa,
        UseCase::ClosedQa,
        UseCase::Brainstorming,
        UseCase::Chat,
        UseCase::Rewrite,
        UseCase::Summarization,
        UseCase::Classification,
        UseCase::Extraction,
        UseCase::Other,
    ];

    /// The wire name, as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            UseCase::Generation => "generation",
            UseCase::OpenQa => "open_qa",
            UseCase::ClosedQa => "closed_qa",
            UseCase::Brainstorming => "brainstorming",
            UseCase::Chat => "chat",
            UseCase::Rewrite => "rewrite",
            UseCase::Summarization => "summarization",
            UseCase::Classification => "classification",
            UseCase::Extraction => "extraction",
            UseCase::Other => "other",
        }
    }

    /// Accepts the wire name and the ways people write it in a header:
    /// `open_qa`, `open-qa`, `Open QA`, `OpenQA` (case and separators ignored).
    pub fn parse(s: &str) -> Option<UseCase> {
        let wanted = normalize(s);
        Self::ALL.into_iter().find(|u| normalize(u.as_str()) == wanted)
    }
}

impl fmt::Display for UseCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The high-stakes domains the paper's deployment policy keeps away from
/// unapproved use: decisions about people that need a human in charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    MedicalDiagnosis,
    ProtectedCharacteristics,
    CreditEligibility,
    EmploymentEligibility,
    HousingEligibility,
    PoliticalAdvertising,
    LawEnforcement,
}

impl Domain {
    pub const ALL: [Domain; 7] = [
        Domain::MedicalDiagnosis,
        Domain::ProtectedCharacteristics,
        Domain::CreditEligibility,
        Domain::EmploymentEligibility,
        Domain::HousingEligibility,
        Domain::PoliticalAdvertising,
        Domain::LawEnforcement,
    ];

    /// The wire name, as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Domain::MedicalDiagnosis => "medical_diagnosis",
            Domain::ProtectedCharacteristics => "protected_characteristics",
            Domain::CreditEligibility => "credit_eligibility",
            Domain::EmploymentEligibility => "employment_eligibility",
            Domain::HousingEligibility => "housing_eligibility",
            Domain::PoliticalAdvertising => "political_advertising",
            Domain::LawEnforcement => "law_enforcement",
        }
    }

    /// Words for messages a person reads.
    pub fn label(self) -> &'static str {
        match self {
            Domain::MedicalDiagnosis => "medical diagnosis",
            Domain::ProtectedCharacteristics => "inferring protected characteristics",
            Domain::CreditEligibility => "credit eligibility decisions",
            Domain::EmploymentEligibility => "employment decisions",
            Domain::HousingEligibility => "housing eligibility decisions",
            Domain::PoliticalAdvertising => "political advertising",
            Domain::LawEnforcement => "law enforcement and criminal justice",
        }
    }

    /// Same leniency as [`UseCase::parse`].
    pub fn parse(s: &str) -> Option<Domain> {
        let wanted = normalize(s);
        Self::ALL.into_iter().find(|d| normalize(d.as_str()) == wanted)
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lower-case letters and digits only, so separators and case never decide.
fn normalize(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_header_spellings() {
        for spelling in ["open_qa", "open-qa", "Open QA", "OPEN_QA", " OpenQA "] {
            assert_eq!(UseCase::parse(spelling), Some(UseCase::OpenQa), "{spelling}");
        }
        assert_eq!(UseCase::parse("Closed-QA"), Some(UseCase::ClosedQa));
        assert_eq!(UseCase::parse("summarisation"), None);
        assert_eq!(UseCase::parse(""), None);
        assert_eq!(Domain::parse("Medical Diagnosis"), Some(Domain::MedicalDiagnosis));
    }

    #[test]
    fn names_round_trip_through_serde() {
        for use_case in UseCase::ALL {
            let json = serde_json::to_string(&use_case).unwrap();
            assert_eq!(json, format!("\"{}\"", use_case.as_str()));
            assert_eq!(UseCase::parse(use_case.as_str()), Some(use_case));
        }
        for domain in Domain::ALL {
            let json = serde_json::to_string(&domain).unwrap();
            assert_eq!(json, format!("\"{}\"", domain.as_str()));
            assert_eq!(serde_json::from_str::<Domain>(&json).unwrap(), domain);
        }
    }
}
