"""A small, deterministic stand-in for ../shared/data: the same files and public field names, invented rows.

Tests use it where the real data is absent (a fresh clone), so that every test runs everywhere. The text
reads like the real thing (clinical abstracts, consumer health questions, case citations, bills) but is
generated here; nothing in it is copied from the datasets.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

FILES = {  # file -> rows
    "healthcare/pubmedqa_train.jsonl": 60,
    "healthcare/hqs_train.jsonl": 60,
    "legal/casehold_train.jsonl": 48,
    "legal/multilegalpile_train.jsonl": 36,
}

TOPICS = [  # condition, intervention, outcome, population
    ("type 2 diabetes", "metformin", "glycated haemoglobin", "adults"),
    ("hypertension", "home blood pressure monitoring", "systolic pressure", "older adults"),
    ("asthma", "inhaled corticosteroids", "emergency visits", "children"),
    ("major depression", "cognitive behavioural therapy", "relapse", "outpatients"),
    ("heart failure", "nurse-led follow-up", "readmission", "patients"),
    ("chronic kidney disease", "dietary protein restriction", "loss of kidney function", "adults"),
    ("osteoporosis", "vitamin D supplementation", "hip fracture", "postmenopausal women"),
    ("community-acquired pneumonia", "early antibiotic therapy", "30-day mortality", "inpatients"),
    ("atrial fibrillation", "anticoagulation", "stroke", "patients over 75"),
    ("obesity", "a structured exercise programme", "body weight", "adolescents"),
]
DESIGNS = ["randomized controlled trial", "prospective cohort study", "retrospective chart review",
           "cross-sectional survey", "case-control study"]
DRUGS = ["cetirizine", "lisinopril", "atorvastatin", "levothyroxine", "amoxicillin", "sertraline", "omeprazole",
         "ibuprofen", "prednisone", "gabapentin"]
SYMPTOMS = ["headaches", "dizziness", "a dry cough", "trouble sleeping", "an upset stomach", "swollen ankles",
            "muscle pain", "a rash on her arms"]
RELATIVES = ["mother", "husband", "son", "daughter", "father", "wife"]
PARTIES = ["Smith", "Johnson", "Acme Corp.", "United States", "Garcia", "Brown", "Lee", "Walker", "Hernandez",
           "First National Bank", "Miller", "Davis", "City of Springfield", "Allied Insurance Co."]
COURTS = ["9th Cir.", "2d Cir.", "5th Cir.", "D.C. Cir.", "3d Cir.", "7th Cir.", "Bankr.D.Del.", "S.D.N.Y."]
HOLDINGS = [
    "holding that the insurance policy proceeds were property of the bankruptcy estate",
    "holding that a district court abuses its discretion when it fails to consider the statutory factors",
    "holding that the officer lacked probable cause to search the vehicle",
    "holding that the contract was unenforceable for want of consideration",
    "holding that the agency's interpretation of the regulation was entitled to deference",
    "holding that the plaintiff failed to exhaust administrative remedies before filing suit",
    "holding that the statute of limitations began to run when the injury was discovered",
    "holding that the employer was not liable for the independent contractor's negligence",
    "holding that a prior conviction may not be used to enhance the sentence without notice",
    "holding that the arbitration clause covered the employee's discrimination claims",
    "holding that the trial court properly excluded the expert testimony as unreliable",
    "holding that the search warrant was supported by a sufficiently detailed affidavit",
]
BILL_TOPICS = [("Rural Health Clinic Improvement", "rural health clinics"), ("Clean Water Infrastructure", "water systems"),
               ("Veterans Housing Assistance", "housing for veterans"), ("Small Business Lending", "small business loans"),
               ("Broadband Access", "broadband service in underserved areas"), ("School Nutrition", "school meal programs")]


def pubmedqa_row(rng: random.Random, i: int) -> dict:
    condition, intervention, outcome, population = rng.choice(TOPICS)
    n, design = rng.randint(40, 2400), rng.choice(DESIGNS)
    year = rng.randint(1995, 2019)
    before = rng.uniform(20, 80)
    after = before * rng.uniform(0.6, 1.1)
    p = rng.choice(["0.001", "0.01", "0.03", "0.2", "0.45"])
    decision = rng.choice(["yes", "yes", "no", "maybe"])
    question = rng.choice([f"Does {intervention} reduce {outcome} in {population} with {condition}?",
                           f"Is {intervention} associated with lower {outcome} among {population} with {condition}?",
                           f"Can {intervention} prevent {outcome} in {condition}?"])
    contexts = [
        f"{condition.capitalize()} is a leading cause of morbidity among {population}, and {outcome} remains "
        f"common despite treatment. Whether {intervention} changes this course is not known.",
        f"We conducted a {design} of {n} {population} with {condition} treated at {rng.randint(1, 12)} centres "
        f"between {year - 3} and {year}. The primary end point was {outcome}.",
        f"{outcome.capitalize()} was {before:.1f}% in the comparison group and {after:.1f}% with {intervention} "
        f"(p = {p}). Adverse events were rare and similar between groups.",
    ]
    return {"QUESTION": question, "CONTEXTS": contexts, "LABELS": ["BACKGROUND", "METHODS", "RESULTS"],
            "MESHES": [condition.title(), intervention.title(), "Humans", rng.choice(["Female", "Male"])],
            "YEAR": str(year), "reasoning_required_pred": decision, "reasoning_free_pred": decision,
            "final_decision": decision,
            "LONG_ANSWER": f"In this {design}, {intervention} was {'' if decision == 'yes' else 'not clearly '}"
                           f"associated with less {outcome}.",
            "id": str(20000000 + i)}


def hqs_row(rng: random.Random, i: int) -> dict:
    drug, symptom, relative = rng.choice(DRUGS), rng.choice(SYMPTOMS), rng.choice(RELATIVES)
    months = rng.randint(2, 30)
    kind = rng.randrange(3)
    message = [
        f"My {relative} has been taking {drug} for {months} months and now has {symptom}. Is this a side effect "
        "and should we ask the doctor about changing the dose?",
        f"I was prescribed {drug} last week. Can I take it together with my other medications, and is it safe "
        "to drink alcohol while on it?",
        f"Who makes {drug}? My pharmacy says they cannot get a new supply and I need it every day.",
    ][kind]
    summary = [f"Can {drug} cause {symptom}?", f"What are the drug interactions of {drug}?",
               f"Who manufactures {drug}?"][kind]
    return {"CHQ": f"SUBJECT: {drug} question\nMESSAGE: {message}", "Summary": summary}


def casehold_row(rng: random.Random, i: int) -> dict:
    a, b, c, d = rng.sample(PARTIES, 4)
    holdings = rng.sample(HOLDINGS, 5)
    label = rng.randrange(5)
    prompt = (f"{a} v. {b}, {rng.randint(100, 999)} F.3d {rng.randint(1, 1400)}, {rng.randint(1, 1400)} "
              f"({rng.choice(COURTS)} {rng.randint(1985, 2018)}) (stating that the rule applies with equal force "
              f"here); see also {c} v. {d}, {rng.randint(100, 999)} F.2d {rng.randint(1, 1400)} "
              f"({rng.choice(COURTS)} {rng.randint(1970, 1995)}) (<HOLDING>). The court therefore affirms.")
    return {"example_id": i, "citing_prompt": prompt, **{f"holding_{k}": h for k, h in enumerate(holdings)},
            "label": str(label)}


def multilegalpile_row(rng: random.Random, i: int) -> dict:
    title, subject = rng.choice(BILL_TOPICS)
    number, year = rng.randint(100, 9999), rng.randint(2001, 2022)
    amount = rng.randint(5, 900)
    text = (f"HR {number} IH: {title} Act of {year} US House of Representatives {year}-0{rng.randint(1, 9)}-1"
            f"{rng.randint(0, 9)} A BILL To amend the Public Health Service Act with respect to {subject}, and for "
            f"other purposes. Be it enacted by the Senate and House of Representatives of the United States of "
            f"America in Congress assembled, SECTION 1. SHORT TITLE. This Act may be cited as the ``{title} Act of "
            f"{year}''. SEC. 2. GRANTS. (a) In General.--The Secretary shall award grants to eligible entities "
            f"to improve {subject}. (b) Authorization of Appropriations.--There is authorized to be appropriated "
            f"${amount},000,000 for each of fiscal years {year + 1} through {year + 5} to carry out this section.")
    return {"language": "en", "type": "legislation", "jurisdiction": "US", "text": text}


MAKERS = {"pubmedqa": pubmedqa_row, "hqs": hqs_row, "casehold": casehold_row, "multilegalpile": multilegalpile_row}


def write_synthetic_data(root: Path) -> Path:
    """Write the four domain files under root (same names as ../shared/data) and return root."""
    for name, count in FILES.items():
        rng = random.Random(name)  # str seeds are deterministic across runs
        make = MAKERS[Path(name).stem.removesuffix("_train")]
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(make(rng, i)) + "\n" for i in range(count)))
    return root
