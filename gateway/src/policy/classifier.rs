//! Use-case classification: the trait the policy asks, and the rule-based
//! classifier that answers from `configs/use_cases.toml`.
//!
//! Scoring. Every use-case pattern that matches adds its weight to its
//! category once (however often it matches), and twice its weight when a
//! match lies in the first or last [`INSTRUCTION_CHARS`] characters, where
//! the instruction of a prompt sits: an article pasted under "Summarize
//! this:" must not outvote the instruction with its own words. The highest
//! score wins; ties go to the rule listed first in the file.
//!
//! When nothing matches, a conversation transcript (speaker-labelled lines)
//! is `Chat`, a question is `OpenQa`, and anything else is `Other`.
//!
//! A declared use case (the `X-Use-Case` header) resolves ambiguity but
//! cannot override clear evidence: it is accepted when at least one of its
//! own patterns matches, or when no category matched at all.
//!
//! Domains are reported whatever the use case: every domain with a matching
//! pattern, in [`Domain::ALL`] order.

use regex::{RegexSet, RegexSetBuilder};

use super::rules::{PolicyError, REGEX_SIZE_LIMIT, Rules};
use super::use_case::{Domain, UseCase};

/// Characters at each end of a prompt counted as its instruction.
pub const INSTRUCTION_CHARS: usize = 200;

/// What the classifier concluded about one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub use_case: UseCase,
    /// High-stakes domains the prompt touches, in [`Domain::ALL`] order.
    pub domains: Vec<Domain>,
    /// Whether a declared use case was accepted; `None` when none was declared.
    pub declared_accepted: Option<bool>,
}

pub trait UseCaseClassifier: Send + Sync {
    /// `declared` comes from the client's `X-Use-Case` header: checked, not trusted blindly.
    fn classify(&self, prompt: &str, declared: Option<UseCase>) -> Classification;
}

/// Weighted regular expressions per category and per domain.
pub struct RuleClassifier {
    rules: Rules,
    // One pass over the prompt finds every matching pattern; the individual
    // regexes then only run for patterns that matched, to place the match.
    use_case_set: RegexSet,
    /// Set index → (rule, pattern) in `rules.use_cases`.
    use_case_index: Vec<(usize, usize)>,
    domain_set: RegexSet,
    /// Set index → rule in `rules.domains`.
    domain_index: Vec<usize>,
}

impl RuleClassifier {
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        Self::new(Rules::from_toml_str(text)?)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, PolicyError> {
        Self::new(Rules::from_file(path)?)
    }

    fn new(rules: Rules) -> Result<Self, PolicyError> {
        let mut use_case_sources = Vec::new();
        let mut use_case_index = Vec::new();
        for (r, rule) in rules.use_cases.iter().enumerate() {
            for (p, pattern) in rule.patterns.iter().enumerate() {
                use_case_sources.push(pattern.expanded.as_str());
                use_case_index.push((r, p));
            }
        }
        let mut domain_sources = Vec::new();
        let mut domain_index = Vec::new();
        for (r, rule) in rules.domains.iter().enumerate() {
            for pattern in &rule.patterns {
                domain_sources.push(pattern.expanded.as_str());
                domain_index.push(r);
            }
        }
        Ok(Self {
            use_case_set: build_set("[[use_case]] rules", &use_case_sources)?,
            domain_set: build_set("[[domain]] rules", &domain_sources)?,
            rules,
            use_case_index,
            domain_index,
        })
    }

    /// Each category's score for `prompt`, in rule-file order; categories
    /// without a rule are absent. For diagnostics and tests.
    pub fn scores(&self, prompt: &str) -> Vec<(UseCase, u32)> {
        let mut scores: Vec<(UseCase, u32)> = self.rules.use_cases.iter().map(|r| (r.use_case, 0)).collect();
        let (head_end, tail_start) = instruction_bounds(prompt);
        for i in self.use_case_set.matches(prompt).iter() {
            let (r, p) = self.use_case_index[i];
            let pattern = &self.rules.use_cases[r].patterns[p];
            let in_instruction = tail_start <= head_end
                || pattern.regex.find(prompt).is_some_and(|m| m.start() < head_end)
                || pattern.regex.find_at(prompt, tail_start).is_some();
            let weight = if in_instruction { pattern.weight.saturating_mul(2) } else { pattern.weight };
            scores[r].1 = scores[r].1.saturating_add(weight);
        }
        scores
    }

    /// High-stakes domains `prompt` touches, in [`Domain::ALL`] order.
    pub fn domains(&self, prompt: &str) -> Vec<Domain> {
        let found: Vec<Domain> =
            self.domain_set.matches(prompt).iter().map(|i| self.rules.domains[self.domain_index[i]].domain).collect();
        Domain::ALL.into_iter().filter(|d| found.contains(d)).collect()
    }
}

impl UseCaseClassifier for RuleClassifier {
    fn classify(&self, prompt: &str, declared: Option<UseCase>) -> Classification {
        let scores = self.scores(prompt);
        // Strictly greater, so the first rule in file order wins a tie.
        let best = scores.iter().fold(None::<(UseCase, u32)>, |best, &(use_case, score)| match best {
            Some((_, top)) if top >= score => best,
            _ if score > 0 => Some((use_case, score)),
            _ => best,
        });
        let score_of = |wanted: UseCase| scores.iter().find(|(u, _)| *u == wanted).map_or(0, |&(_, s)| s);
        let (use_case, declared_accepted) = match (declared, best) {
            (None, Some((found, _))) => (found, None),
            (None, None) => (fallback(prompt), None),
            (Some(declared), None) => (declared, Some(true)),
            (Some(declared), Some(_)) if score_of(declared) > 0 => (declared, Some(true)),
            (Some(_), Some((found, _))) => (found, Some(false)),
        };
        Classification { use_case, domains: self.domains(prompt), declared_accepted }
    }
}

fn build_set(what: &str, sources: &[&str]) -> Result<RegexSet, PolicyError> {
    // Same flags as each pattern (see `rules::build`), so set and regex agree.
    RegexSetBuilder::new(sources)
        .case_insensitive(true)
        .multi_line(true)
        .size_limit(REGEX_SIZE_LIMIT.saturating_mul(8))
        .build()
        .map_err(|e| PolicyError::Rule { rule: what.to_string(), message: format!("cannot compile together: {e}") })
}

/// Byte offsets: the instruction head is `..head_end`, the tail `tail_start..`.
fn instruction_bounds(prompt: &str) -> (usize, usize) {
    let head_end = prompt.char_indices().nth(INSTRUCTION_CHARS).map_or(prompt.len(), |(i, _)| i);
    let tail_start = prompt.char_indices().rev().nth(INSTRUCTION_CHARS - 1).map_or(0, |(i, _)| i);
    (head_end, tail_start)
}

/// The category of a prompt no pattern matched.
fn fallback(prompt: &str) -> UseCase {
    if looks_like_transcript(prompt) {
        UseCase::Chat
    } else if looks_like_question(prompt) {
        UseCase::OpenQa
    } else {
        UseCase::Other
    }
}

const QUESTION_WORDS: [&str; 20] = [
    "what", "who", "whom", "whose", "when", "where", "why", "which", "how", "is", "are", "was", "were", "do", "does",
    "did", "can", "could", "should", "would",
];

fn looks_like_question(prompt: &str) -> bool {
    let text = prompt.trim();
    let first = text.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("").to_lowercase();
    text.ends_with('?') || QUESTION_WORDS.contains(&first.as_str())
}

/// At least three `Speaker: ...` lines from at least two speakers: a
/// dialogue to continue. Two labels alone are too often a form
/// ("Text: ... Answer:").
fn looks_like_transcript(prompt: &str) -> bool {
    let mut speakers: Vec<String> = Vec::new();
    let mut turns = 0;
    for line in prompt.lines() {
        let Some((label, _)) = line.split_once(':') else { continue };
        let label = label.trim();
        let is_name = !label.is_empty()
            && label.len() <= 24
            && label.split_whitespace().count() <= 3
            && label.starts_with(|c: char| c.is_alphabetic())
            && label.chars().all(|c| c.is_alphabetic() || c == ' ' || c == '_' || c == '-' || c == '.');
        if is_name {
            turns += 1;
            let label = label.to_lowercase();
            if !speakers.contains(&label) {
                speakers.push(label);
            }
        }
    }
    turns >= 3 && speakers.len() >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/use_cases.toml"));

    fn shipped() -> RuleClassifier {
        RuleClassifier::from_toml_str(SHIPPED).expect("configs/use_cases.toml loads")
    }

    #[test]
    fn shipped_rules_load_from_file() {
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/use_cases.toml"));
        let classifier = RuleClassifier::from_file(path).unwrap();
        let named: Vec<UseCase> = classifier.rules.use_cases.iter().map(|r| r.use_case).collect();
        for use_case in UseCase::ALL.into_iter().filter(|u| *u != UseCase::Other) {
            assert!(named.contains(&use_case), "no rule for {use_case}");
        }
        let domains: Vec<Domain> = classifier.rules.domains.iter().map(|r| r.domain).collect();
        for domain in Domain::ALL {
            assert!(domains.contains(&domain), "no rule for {domain}");
        }
    }

    const EXAMPLES: &[(UseCase, &str)] = &[
        (UseCase::Generation, "Write a short story about a dragon who is afraid of fire."),
        (UseCase::Generation, "Write a poem about the ocean."),
        (UseCase::Generation, "Compose a cover letter for a junior data analyst position at a bank."),
        (UseCase::Generation, "Draft an email to my landlord saying the heating is broken."),
        (UseCase::Generation, "Once upon a time, in a village at the edge of the forest, there lived"),
        (UseCase::Generation, "Write a Python function that returns the n-th Fibonacci number."),
        (UseCase::Generation, "Tell me a joke about penguins."),
        (UseCase::OpenQa, "What is the capital of France?"),
        (UseCase::OpenQa, "Who was the first person to walk on the moon?"),
        (UseCase::OpenQa, "Why is the sky blue?"),
        (UseCase::OpenQa, "Explain how photosynthesis works."),
        (UseCase::OpenQa, "How many bones are in the human body?"),
        (UseCase::OpenQa, "What's the difference between a virus and a bacterium?"),
        (
            UseCase::ClosedQa,
            "The Acme Corporation was founded in 1952 by Jane Doe in Ohio. It now employs 3,000 people.\n\n\
             Based on the passage above, who founded the company?",
        ),
        (
            UseCase::ClosedQa,
            "Answer the question using only the text below.\nText: Mount Kilimanjaro is a dormant volcano in \
             Tanzania.\nQuestion: In which country is Kilimanjaro?",
        ),
        (
            UseCase::ClosedQa,
            "According to the article, why did the bridge collapse?\n\nArticle: Engineers found that corrosion \
             had weakened the steel supports for years before the collapse.",
        ),
        (
            UseCase::ClosedQa,
            "Read the paragraph and answer: what does the author say about remote work?\n\nParagraph: Remote \
             work, the author argues, rewards clear writing over long meetings.",
        ),
        (UseCase::Brainstorming, "List five ideas for a birthday party."),
        (UseCase::Brainstorming, "Brainstorm names for a coffee shop near the university."),
        (UseCase::Brainstorming, "What are some fun things to do in Paris on a rainy day?"),
        (UseCase::Brainstorming, "Give me 10 gift ideas for my dad, who loves fishing."),
        (UseCase::Brainstorming, "Come up with a few creative themes for our company retreat."),
        (
            UseCase::Chat,
            "The following is a conversation with an AI assistant. The assistant is helpful, creative, clever, \
             and very friendly.\n\nHuman: Hello, who are you?\nAI: I am an AI created by OpenAI. How can I help \
             you today?\nHuman: I'd like to cancel my subscription.\nAI:",
        ),
        (UseCase::Chat, "Hi there! How are you doing today?"),
        (UseCase::Chat, "Let's chat about your favourite movies. You go first."),
        (
            UseCase::Chat,
            "You are a friendly customer support bot for a bike shop. Stay in character.\nCustomer: My order \
             hasn't arrived.\nAgent:",
        ),
        (UseCase::Rewrite, "Rewrite this paragraph in a formal tone: hey guys, the meeting got moved to 3, pls come."),
        (UseCase::Rewrite, "Translate the following sentence into French: Where is the train station?"),
        (UseCase::Rewrite, "Paraphrase this sentence so it sounds less aggressive: You never listen to me."),
        (UseCase::Rewrite, "Fix the grammar and spelling in this email: i has went to the store yesterday."),
        (UseCase::Rewrite, "Make this text more concise: In order to be able to make a decision, we need data."),
        (
            UseCase::Summarization,
            "Summarize this article for a second grader: The James Webb Space Telescope is the largest optical \
             telescope in space. Its high resolution lets it see objects too old and distant for Hubble.",
        ),
        (UseCase::Summarization, "tl;dr: The council met on Tuesday and voted to extend library hours."),
        (
            UseCase::Summarization,
            "What are the key takeaways from this meeting transcript?\n\nAlice: We ship Friday. Bob: QA needs \
             two more days. Alice: Then we ship Tuesday.",
        ),
        (
            UseCase::Summarization,
            "Give me a one-paragraph summary of the plot of Hamlet, focusing on the main characters.",
        ),
        (
            UseCase::Classification,
            "Classify the sentiment of this tweet as positive or negative: I can't believe how good this pizza is!",
        ),
        (UseCase::Classification, "Is this email spam or not spam? 'Congratulations, you won a free cruise!'"),
        (
            UseCase::Classification,
            "Categorize each of these expenses into food, transport or housing: rent, bus ticket, groceries.",
        ),
        (UseCase::Classification, "Which genre does this book description belong to: a detective hunts a killer."),
        (
            UseCase::Extraction,
            "Extract all the company names from the text below:\n\nApple and Microsoft reported earnings, \
             while Tesla fell.",
        ),
        (
            UseCase::Extraction,
            "List all the email addresses mentioned in this message: contact bob@example.com or \
             sales@example.org.",
        ),
        (
            UseCase::Extraction,
            "Pull out the dates and amounts from this invoice and return them as JSON: Invoice dated 3 May, \
             total $420.",
        ),
        (UseCase::Extraction, "Find every ingredient mentioned in this recipe: whisk two eggs with flour and milk."),
        // Prompts in the style of the paper's appendix examples.
        (UseCase::Brainstorming, "What are 10 science fiction books I should read next?"),
        (UseCase::Brainstorming, "What are some key points I should know when studying Ancient Greece?"),
        (
            UseCase::Classification,
            "The following is a list of companies and the categories they fall into:\n\nApple, Facebook, Fedex\n\n\
             Apple\nCategory: Technology\n\nFacebook\nCategory: Social Media\n\nFedex\nCategory:",
        ),
        (
            UseCase::Extraction,
            "Given the following list of movie titles, write down any names of cities in the titles.\n\n\
             Paris, Texas\nManchester by the Sea",
        ),
        (UseCase::Generation, "Write a creative ad for the following product to run on Facebook aimed at parents:"),
        (UseCase::Rewrite, "Correct this to standard English:\n\nShe no went to the market."),
        (
            UseCase::Chat,
            "Marv is a chatbot that reluctantly answers questions with sarcastic responses.\n\nYou: How many \
             pounds are in a kilogram?\nMarv: This again? There are 2.2 pounds in a kilogram.\nYou: What does \
             HTML stand for?\nMarv:",
        ),
        (
            UseCase::ClosedQa,
            "Tell me how hydrogen and helium are different, using the following facts:\n- Hydrogen has one \
             proton\n- Helium has two protons",
        ),
        (
            UseCase::Summarization,
            "Customer: my package is late\nAgent: sorry, let me check\nCustomer: it's been two weeks\n\n\
             Summarize the above conversation between a customer and customer assistant.",
        ),
        (UseCase::OpenQa, "How do you take the derivative of the sin function?"),
    ];

    #[test]
    fn shipped_rules_classify_realistic_prompts() {
        let classifier = shipped();
        let mut wrong = Vec::new();
        for (expected, prompt) in EXAMPLES {
            let got = classifier.classify(prompt, None);
            if got.use_case != *expected {
                wrong.push(format!(
                    "{prompt:?}\n  expected {expected}, got {} {:?}",
                    got.use_case,
                    classifier.scores(prompt)
                ));
            }
        }
        assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
        for use_case in UseCase::ALL.into_iter().filter(|u| *u != UseCase::Other) {
            assert!(EXAMPLES.iter().filter(|(u, _)| *u == use_case).count() >= 3, "too few examples of {use_case}");
        }
    }

    #[test]
    fn long_prompts_classify_quickly() {
        // Counted repetitions such as `{0,60}` or Unicode `\b` in the rule
        // file once made this take ~400 ms per 100 KB (the lazy DFA gave up);
        // now it is well under a millisecond. The bound is loose for slow CI.
        let classifier = shipped();
        let unit = "Le comité a revu le budget — été, café, naïve; the quick brown fox wrote a story. ";
        let prompt = format!("Summarize this:\n{}", unit.repeat(400_000 / unit.len()));
        let started = std::time::Instant::now();
        assert_eq!(classifier.classify(&prompt, None).use_case, UseCase::Summarization);
        let elapsed = started.elapsed();
        assert!(elapsed < std::time::Duration::from_millis(300), "classifying 400 KB took {elapsed:?}");
    }

    #[test]
    fn long_pasted_text_does_not_outvote_the_instruction() {
        let classifier = shipped();
        // The article body is full of other categories' words.
        let body = "Why do people write poems? Some brainstorm ideas, others translate stories, and a few \
                    classify them by genre. "
            .repeat(20);
        let prompt = format!("Summarize the following article in two sentences:\n\n{body}");
        assert_eq!(classifier.classify(&prompt, None).use_case, UseCase::Summarization);
    }

    const DOMAIN_EXAMPLES: &[(Domain, &str)] = &[
        (Domain::MedicalDiagnosis, "I have a fever, a stiff neck and a rash. What illness do I have?"),
        (Domain::MedicalDiagnosis, "Can you diagnose my symptoms? Chest pain when I climb stairs."),
        (
            Domain::MedicalDiagnosis,
            "Here are my blood test results, please interpret them and tell me if I have diabetes.",
        ),
        (Domain::MedicalDiagnosis, "Is this mole on my arm cancer? It is dark and irregular."),
        (Domain::ProtectedCharacteristics, "Based on their names, guess the ethnicity of each applicant."),
        (Domain::ProtectedCharacteristics, "Determine the sexual orientation of the author from this blog post."),
        (Domain::ProtectedCharacteristics, "From this photo, what religion is this person?"),
        (Domain::CreditEligibility, "Assess the creditworthiness of this applicant: income $40k, two late payments."),
        (Domain::CreditEligibility, "Should we approve the loan for this customer given the following history?"),
        (Domain::CreditEligibility, "Should we lend $20,000 to this small business?"),
        (Domain::EmploymentEligibility, "Here are three resumes. Rank these candidates for the engineering role."),
        (Domain::EmploymentEligibility, "Should we hire this applicant? Here's her CV."),
        (Domain::EmploymentEligibility, "Screen these resumes and tell me which to reject."),
        (Domain::HousingEligibility, "Run a tenant screening on these three applicants for my apartment."),
        (Domain::HousingEligibility, "Should I rent to this family? They have two dogs and a past eviction."),
        (Domain::PoliticalAdvertising, "Write a campaign ad for Senator Smith's re-election."),
        (Domain::PoliticalAdvertising, "Write a Facebook post convincing voters in Ohio to vote for the Green Party."),
        (Domain::PoliticalAdvertising, "Draft a political ad attacking my opponent's record on taxes."),
        (Domain::LawEnforcement, "Predict recidivism for this defendant from his record."),
        (Domain::LawEnforcement, "From these witness statements, identify the suspect."),
        (Domain::LawEnforcement, "Identify the shooter in this CCTV footage."),
        (Domain::LawEnforcement, "Help me set up surveillance of the protesters' group chat to track the organizers."),
    ];

    #[test]
    fn shipped_rules_detect_domains() {
        let classifier = shipped();
        let mut wrong = Vec::new();
        for (domain, prompt) in DOMAIN_EXAMPLES {
            let found = classifier.classify(prompt, None).domains;
            if !found.contains(domain) {
                wrong.push(format!("{prompt:?}: expected {domain}, got {found:?}"));
            }
        }
        assert!(wrong.is_empty(), "missed:\n{}", wrong.join("\n"));
        for domain in Domain::ALL {
            assert!(DOMAIN_EXAMPLES.iter().filter(|(d, _)| *d == domain).count() >= 2, "too few examples of {domain}");
        }
    }

    #[test]
    fn benign_prompts_touch_no_domain() {
        let classifier = shipped();
        for prompt in [
            "Write a poem about the ocean",
            "How can I improve my credit score?",
            "Diagnose why this Rust code panics: let v: Vec<u8> = vec![]; v[0];",
            "Write a cover letter for a software engineering job.",
            "Summarize the history of the Roman Republic.",
            "Explain what a mortgage is.",
            "Write a short story about a detective who catches a thief.",
            "What are the symptoms of the flu?",
            "List five ideas for a birthday party.",
            "Write an essay on the history of voting rights.",
            "Classify these animals as mammals or reptiles: snake, dog, lizard.",
            "Write a thriller where the detective must identify the killer before midnight.",
            "Explain how facial recognition technology works.",
            "How do banks decide whether to approve a loan?",
            "Write a job description for a senior backend engineer.",
            "Help me write a rental listing for my apartment.",
            "What is the religion of most people in Indonesia?",
            "Translate this political speech into Spanish.",
            "Track down the bug in this function.",
        ] {
            let found = classifier.classify(prompt, None).domains;
            assert!(found.is_empty(), "{prompt:?} flagged {found:?}");
        }
    }

    #[test]
    fn declared_use_case_resolves_ambiguity_only() {
        let classifier = shipped();
        let poem = "Write a poem about the ocean";
        let consistent = classifier.classify(poem, Some(UseCase::Generation));
        assert_eq!((consistent.use_case, consistent.declared_accepted), (UseCase::Generation, Some(true)));
        let contradicted = classifier.classify(poem, Some(UseCase::Classification));
        assert_eq!((contradicted.use_case, contradicted.declared_accepted), (UseCase::Generation, Some(false)));
        assert_eq!(classifier.classify(poem, None).declared_accepted, None);

        // Both brainstorming and open QA match; the header picks between them.
        let ambiguous = "What are some good names for a cat?";
        let scores = classifier.scores(ambiguous);
        let score = |u: UseCase| scores.iter().find(|(x, _)| *x == u).map_or(0, |s| s.1);
        assert!(score(UseCase::Brainstorming) > 0 && score(UseCase::OpenQa) > 0, "{scores:?}");
        let declared = classifier.classify(ambiguous, Some(UseCase::OpenQa));
        assert_eq!((declared.use_case, declared.declared_accepted), (UseCase::OpenQa, Some(true)));

        // Nothing matches at all: the declaration is believed.
        let opaque = "Acme Corp, 1952, Jane Doe, Ohio, 3000 employees";
        assert!(classifier.scores(opaque).iter().all(|s| s.1 == 0), "{:?}", classifier.scores(opaque));
        let declared = classifier.classify(opaque, Some(UseCase::Extraction));
        assert_eq!((declared.use_case, declared.declared_accepted), (UseCase::Extraction, Some(true)));
        assert_eq!(classifier.classify(opaque, None).use_case, UseCase::Other);
    }

    #[test]
    fn ties_go_to_the_rule_listed_first() {
        let rules = "[[use_case]]\nname = 'rewrite'\npatterns = ['shared']\n\
                     [[use_case]]\nname = 'generation'\npatterns = ['shared', 'only-gen']";
        let classifier = RuleClassifier::from_toml_str(rules).unwrap();
        assert_eq!(classifier.classify("shared", None).use_case, UseCase::Rewrite);
        assert_eq!(classifier.classify("shared only-gen", None).use_case, UseCase::Generation);
    }

    #[test]
    fn fallback_when_nothing_matches() {
        let classifier = RuleClassifier::from_toml_str("[[use_case]]\nname = 'rewrite'\npatterns = ['zzz']").unwrap();
        assert_eq!(classifier.classify("Is it going to rain tomorrow", None).use_case, UseCase::OpenQa);
        assert_eq!(classifier.classify("the weather tomorrow?", None).use_case, UseCase::OpenQa);
        let transcript = "Alice: hi\nBob: hello there\nAlice: how was the trip";
        assert_eq!(classifier.classify(transcript, None).use_case, UseCase::Chat);
        assert_eq!(classifier.classify("Text: some words\nAnswer:", None).use_case, UseCase::Other);
        assert_eq!(classifier.classify("", None).use_case, UseCase::Other);
    }

    #[test]
    fn instruction_bounds_respect_char_boundaries() {
        let prompt = "é".repeat(500);
        let (head_end, tail_start) = instruction_bounds(&prompt);
        assert_eq!((head_end, tail_start), (400, 600));
        assert_eq!(instruction_bounds("short"), (5, 0));
    }
}
