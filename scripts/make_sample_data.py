"""Generate the SYNTHETIC sample dataset used by the quick start.

THIS DATA IS SYNTHETIC. Every comment in
``data/sample_bangla_cyberbullying_synthetic.csv`` was written for this project
by filling hand-written Bangla templates with small vocabulary lists. None of it
is a real social-media comment, none of it is copied from the real Bangla
cyberbullying dataset, and none of it is about a real person. The file exists
only so that the quick start can train, compress and evaluate a model offline
in a few minutes; results measured on it say nothing about real-world
cyberbullying detection. Use the real dataset for any reported number.

The file has the same schema as the real dataset::

    Gender,Profession,comment,bully,sexual,religious,threat,spam

``Gender`` and ``Profession`` describe the (fictional) target of the comment and
are not labels; the five label columns are 0/1 integers and a row may carry
several labels at once. The generator deliberately reproduces two quirks of the
real data that a loader has to cope with:

* about ten exact duplicates (same comment text, same labels), and
* three comment texts that occur twice with *different* labels.

The content is kept mild (everyday insults such as "বেয়াদব" or "ফালতু", threats
such as "তোকে দেখে নেব"). Phone numbers use the unallocated ``০১০`` prefix and
links use the reserved ``.example`` top-level domain, so neither can point at
anything real.

The output is deterministic: the same seed always gives byte-identical output.
Only the standard library is used (``random``, ``csv``).

Usage::

    python scripts/make_sample_data.py            # writes the default path
    python scripts/make_sample_data.py --out x.csv --seed 7
"""

from __future__ import annotations

import argparse
import csv
import random
from collections import Counter
from pathlib import Path

SEED = 20240611
N_ROWS = 400
N_EXACT_DUPLICATES = 10
N_CONFLICTING = 3
MIN_WORDS, MAX_WORDS = 3, 20

LABELS = ("bully", "sexual", "religious", "threat", "spam")
HEADER = ("Gender", "Profession", "comment") + LABELS
PROFESSIONS = ("actor", "singer", "dancer", "politician", "sports", "social")

DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "data" / "sample_bangla_cyberbullying_synthetic.csv"
)

# How many unique rows of each label combination to generate. Chosen so that,
# over the 400 rows, bully is ~55%, sexual ~15%, religious ~12%, threat ~12%,
# spam ~10%, ~25% carry no label and ~30% carry two or more labels.
PROFILE_COUNTS = (
    ((), 97),
    (("bully",), 117),
    (("bully", "threat"), 34),
    (("bully", "religious"), 29),
    (("bully", "sexual"), 24),
    (("bully", "spam"), 5),
    (("bully", "religious", "threat"), 5),
    (("sexual",), 19),
    (("sexual", "spam"), 15),
    (("religious",), 13),
    (("religious", "threat"), 4),
    (("threat",), 8),
    (("spam",), 17),
)

# ---------------------------------------------------------------------------
# Vocabulary. Fillers and addressees appear in every class so they carry no
# label signal on their own.
# ---------------------------------------------------------------------------
ADDRESS = ["ভাই", "আপু", "দাদা", "ভাইয়া", "আপা", "মামা", "বস", "স্যার", "দিদি"]
FILLERS = ["আসলে", "সত্যি বলছি", "আরে", "এই যে", "শোনো", "হায়রে", "বাহ", "উফ", "আচ্ছা", "দেখো"]
ENDINGS = ["", "", "", "।", "!", "!!", "?", "...", " 😂", " 😡", " ❤️", " 👍"]
THINGS = ["অভিনয়", "গান", "নাচ", "কথাবার্তা", "ভিডিও", "চেহারা", "রাজনীতি", "খেলা", "স্টাইল", "হাসি", "গলা", "পোস্ট"]
SKILLS = ["অভিনয়", "গান", "নাচ", "রাজনীতি", "খেলা", "উপস্থাপনা"]      # things one "does"
CONTENT = ["ভিডিও", "পোস্ট", "লাইভ", "নাটক", "গান", "টিকটক"]          # things one "puts out"

# neutral / positive -------------------------------------------------------
PRAISE = ["অসাধারণ হয়েছে", "খুব ভালো লাগলো", "মন ছুঁয়ে গেল", "দারুণ হয়েছে", "চমৎকার",
          "অনেক সুন্দর", "একদম মনের মত", "সেরা হয়েছে", "বারবার দেখতে ইচ্ছা করে", "মুগ্ধ হলাম"]
WISHES = ["শুভকামনা রইল", "এগিয়ে যান", "ভালোবাসা রইল", "আরো কাজ চাই", "দোয়া রইল",
          "পাশে আছি সবসময়", "অনেক দূর যাবেন", "ভালো থাকবেন", "নতুন কাজের অপেক্ষায় রইলাম"]
QUESTIONS = ["পরের পর্ব কবে আসবে", "এই গানটার নাম কি", "এই জায়গাটা কোথায়", "কবে রিলিজ হবে",
             "শুটিং কোথায় হয়েছিল", "পুরো গানটা কোথায় পাব", "আজকের ম্যাচ কখন শুরু", "টিকিট কোথায় পাওয়া যাবে"]
NEUTRAL_LINES = ["আজকে বৃষ্টির দিনে গানটা শুনলাম", "ছোটবেলার কথা মনে পড়ে গেল", "প্রথম কমেন্ট আমার",
                 "মা বাবার সাথে বসে দেখলাম", "অফিস থেকে ফিরে ভিডিওটা দেখলাম", "গ্রামের বাড়ির কথা মনে পড়লো",
                 "এই মানুষটাকে অনেক আগে থেকে চিনি", "কেউ কি আমার মত রাত জেগে দেখছেন",
                 "এইটা কোন সালের ভিডিও", "আমাদের এলাকায় এসেছিলেন একবার", "চা খেতে খেতে দেখছি"]

# bully --------------------------------------------------------------------
INSULTS = ["বেয়াদব", "ফালতু", "বলদ", "গাধা", "অশিক্ষিত", "নির্লজ্জ", "বেহায়া", "বোকা", "ছাগল",
           "অভদ্র", "বাটপার", "মূর্খ", "ভণ্ড", "জোকার", "নাটকবাজ", "অকর্মা", "আবাল", "ছ্যাচড়া",
           "ফকিন্নি", "চাপাবাজ", "হাবাগোবা", "থার্ডক্লাস"]
BAD = ["জঘন্য", "বাজে", "ফালতু", "অখাদ্য", "বিরক্তিকর", "হাস্যকর", "থার্ডক্লাস", "একদম ফাউল"]
BULLY_TEMPLATES = [
    "তুই একটা {insult}",
    "এই {insult}টাকে কে দেখে",
    "{insult} মার্কা {thing}",
    "তোর মত {insult} আর দেখি নাই",
    "এত {insult} কেন তুই",
    "তোর {thing} একদম {bad}",
    "{insult} আর {insult2} একসাথে",
    "তোর {thing} দেখলেই বিরক্ত লাগে",
    "লজ্জা থাকলে আর {content} দিস না",
    "তোরে দিয়ে কিছু হবে না {insult}",
    "এইসব {insult} লোক কোথা থেকে আসে",
    "{skill} না পারলে বাদ দে {insult}",
    "কি {bad} {thing} রে বাবা",
    "মানুষ এত {insult} হয় কিভাবে",
    "তোর মুখ দেখাস না আর {insult}",
    "টাকা দিয়ে ভিউ কিনে এই {insult}",
]

# sexual (kept mild, non-graphic) -----------------------------------------
SEXUAL_TEMPLATES = [
    "ফিগারটা জোস",
    "আজকে খুব হট লাগছে",
    "কোমর দুলানিটা দেখার মত",
    "এত খোলামেলা পোশাকে দারুণ লাগে",
    "রাতে একা দেখা করবা",
    "সেক্সি লাগছে {address}",
    "ফুল ভিডিও দাও প্লিজ",
    "পোশাক আরেকটু ছোট হলে ভালো হত",
    "তোমার সাথে এক রাত কাটাতে চাই",
    "ঠোঁট দুটো একদম নেশা ধরায়",
    "শরীরটা যা বানিয়েছ",
    "ওড়না ছাড়া আরো ভালো লাগে",
    "বিছানার ভিডিও কবে আসবে",
    "একান্তে দেখা করতে চাই",
    "কাপড়টা একটু সরাও তো",
]
SEXUAL_BULLY_TEMPLATES = [
    "শরীর দেখিয়ে ভাইরাল হতে চায় এই {insult}",
    "{insult} মেয়ে কাপড় ছাড়া নাচে",
    "শরীর বেচে নাম কামাইছে {insult}টা",
    "খোলামেলা পোশাক পরে {content} করে এই {insult}",
]

# religious ---------------------------------------------------------------
REL_GROUPS = ["নাস্তিক", "কাফের", "মুরতাদ", "বিধর্মী", "ধর্মদ্রোহী", "ইহুদির দালাল"]
RELIGIOUS_TEMPLATES = [
    "আল্লাহ তোকে হেদায়েত দান করুক",
    "জাহান্নামেও তোর জায়গা হবে না",
    "{group}দের কোনো ইমান নাই",
    "ধর্ম নিয়ে মশকরা করিস কেন",
    "এসব করলে দোজখে যাবি",
    "পর্দা না করলে গজব পড়বে",
    "মুসলমানের মেয়ে হয়ে এসব কি করছ",
    "এইটা পুরাই হারাম কাজ",
    "ধর্মের অবমাননা করছে এই {group}",
    "পূজার মন্ডপে এসব মানায় না",
    "ভগবান তোকে ক্ষমা করবে না",
    "মসজিদের সামনে এসব করার সাহস কোথায় পাস",
    "এরা সব {group} ধর্মের শত্রু",
    "ঈমান থাকলে এই কাজ করতে পারতি না",
    "কেয়ামতের দিন এর হিসাব দিতে হবে",
    "নামাজ রোজা বাদ দিয়ে {content} নিয়ে পড়ে আছিস",
]

# threat ------------------------------------------------------------------
THREAT_TEMPLATES = [
    "তোকে দেখে নেব",
    "মেরে ফেলব একদম",
    "রাস্তায় পাইলে খবর আছে",
    "তোর বাসা কিন্তু চিনি",
    "হাত পা ভেঙে দেব",
    "সাবধানে থাকিস",
    "দেশ ছাড়া করব তোকে",
    "এক থাপ্পড়ে দাঁত ফেলে দেব",
    "পিটিয়ে সোজা করে দেব",
    "কবর খুঁড়ে রাখ",
    "বাঁচতে চাইলে চুপ থাক",
    "শেষ করে দেব তোকে",
    "সামনে পাইলে আর আস্ত রাখব না",
    "আর একটা {content} দিলে জানে মেরে ফেলব",
    "তোর দিন শেষ বুঝলি",
    "বাইরে বের হলে টের পাবি",
]

# spam --------------------------------------------------------------------
SPAM_HOOKS = ["ঘরে বসে আয় করুন", "দিনে {amount} টাকা ইনকাম করুন", "অনলাইনে পার্ট টাইম চাকরি",
              "ফ্রি রিচার্জ পেতে এখনই যোগ দিন", "মোবাইল দিয়ে মাসে {amount} টাকা আয়",
              "পেজে লাইক দিন আর পুরস্কার জিতুন", "আমার চ্যানেলটা সাবস্ক্রাইব করুন",
              "ফলো দিলে ফলো ব্যাক", "বিনা পুঁজিতে ব্যবসা শুরু করুন", "লটারিতে আইফোন জিতুন"]
SPAM_CONTACTS = ["ইনবক্সে যোগাযোগ করুন", "বিস্তারিত জানতে ইনবক্সে যোগাযোগ", "লিংকে ক্লিক করুন {link}",
                 "এখনই ভিজিট করুন {link}", "কল করুন {phone}", "হোয়াটসঅ্যাপ {phone}", "নক দিন {phone}",
                 "{link}"]
SPAM_SITES = ["ayincome", "kaj-korun", "free-recharge", "taka-bd", "job-online", "lucky-draw", "earn-daily"]
SPAM_PATHS = ["join", "free", "offer", "reg", "bonus", "start"]
SEXUAL_SPAM_TEMPLATES = [
    "গরম ভিডিও দেখতে লিংকে যান {link}",
    "ফুল ভিডিও পেতে ইনবক্সে যোগাযোগ করুন",
    "একান্ত ছবি চাইলে নক দিন {phone}",
    "হট মেয়েদের সাথে চ্যাট করতে ভিজিট করুন {link}",
    "ভাইরাল গোপন ভিডিও এখানে {link}",
    "রাতে কথা বলতে চাইলে কল করুন {phone}",
]

BN_DIGITS = "০১২৩৪৫৬৭৮৯"


# ---------------------------------------------------------------------------
# Fragment builders
# ---------------------------------------------------------------------------
def bn_number(rng: random.Random, n_digits: int) -> str:
    return "".join(rng.choice(BN_DIGITS) for _ in range(n_digits))


def fill(rng: random.Random, template: str) -> str:
    insult, insult2 = rng.sample(INSULTS, 2)
    return template.format(
        insult=insult,
        insult2=insult2,
        thing=rng.choice(THINGS),
        skill=rng.choice(SKILLS),
        content=rng.choice(CONTENT),
        bad=rng.choice(BAD),
        group=rng.choice(REL_GROUPS),
        address=rng.choice(ADDRESS),
        amount=rng.choice(["৫০০", "১০০০", "২০০০", "৫০০০", "১০,০০০", "৩০,০০০"]),
        # ০১০ is not an allocated Bangladeshi mobile prefix; .example is reserved.
        phone="০১০" + bn_number(rng, 2) + "-" + bn_number(rng, 6),
        link=f"www.{rng.choice(SPAM_SITES)}.example/{rng.choice(SPAM_PATHS)}",
    )


def neutral_fragment(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return f"{rng.choice(['আপনার', 'তোমার', 'এই'])} {rng.choice(THINGS)} {rng.choice(PRAISE)}"
    if kind < 0.55:
        return rng.choice(QUESTIONS)
    if kind < 0.8:
        return rng.choice(NEUTRAL_LINES)
    return rng.choice(WISHES)


def spam_fragment(rng: random.Random) -> str:
    return fill(rng, rng.choice(SPAM_HOOKS)) + " " + fill(rng, rng.choice(SPAM_CONTACTS))


def fragments_for(rng: random.Random, labels: tuple[str, ...]) -> list[str]:
    """One phrase per label, with dedicated mixed templates for some pairs."""
    labels = list(labels)
    parts: list[str] = []
    if not labels:
        parts.append(neutral_fragment(rng))
        if rng.random() < 0.45:
            parts.append(rng.choice(WISHES) if rng.random() < 0.6 else neutral_fragment(rng))
        return parts
    # Mixed templates that express two labels in one phrase.
    if "sexual" in labels and "spam" in labels and rng.random() < 0.7:
        parts.append(fill(rng, rng.choice(SEXUAL_SPAM_TEMPLATES)))
        labels.remove("sexual")
        labels.remove("spam")
    if "sexual" in labels and "bully" in labels and rng.random() < 0.5:
        parts.append(fill(rng, rng.choice(SEXUAL_BULLY_TEMPLATES)))
        labels.remove("sexual")
        labels.remove("bully")
    for label in labels:
        if label == "bully":
            parts.append(fill(rng, rng.choice(BULLY_TEMPLATES)))
        elif label == "sexual":
            parts.append(fill(rng, rng.choice(SEXUAL_TEMPLATES)))
        elif label == "religious":
            parts.append(fill(rng, rng.choice(RELIGIOUS_TEMPLATES)))
        elif label == "threat":
            parts.append(fill(rng, rng.choice(THREAT_TEMPLATES)))
        elif label == "spam":
            parts.append(spam_fragment(rng))
    # Single-label rows sometimes get a second phrase of the same kind.
    if len(parts) == 1 and list(labels) == ["bully"] and rng.random() < 0.3:
        parts.append(fill(rng, rng.choice(BULLY_TEMPLATES)))
    return parts


def make_comment(rng: random.Random, labels: tuple[str, ...]) -> str:
    parts = fragments_for(rng, labels)
    rng.shuffle(parts)
    if rng.random() < 0.35:
        parts.insert(0, rng.choice(ADDRESS))
    elif rng.random() < 0.25:
        parts.insert(0, rng.choice(FILLERS))
    if rng.random() < 0.15:
        parts.append(rng.choice(ADDRESS))
    sep = rng.choice([" ", " ", ", "])
    return (sep.join(parts) + rng.choice(ENDINGS)).strip()


def pick_target(rng: random.Random, labels: tuple[str, ...]) -> tuple[str, str]:
    """Fictional target's gender/profession; sexual comments skew female, as in the real data."""
    p_female = 0.85 if "sexual" in labels else 0.55
    gender = "female" if rng.random() < p_female else "male"
    weights = [3, 3, 2, 1, 1, 2] if gender == "female" else [3, 2, 1, 3, 3, 2]
    if "religious" in labels or "threat" in labels:
        weights[PROFESSIONS.index("politician")] += 2
    return gender, rng.choices(PROFESSIONS, weights=weights)[0]


def row_for(gender: str, profession: str, comment: str, labels: tuple[str, ...]) -> dict:
    row = {"Gender": gender, "Profession": profession, "comment": comment}
    row.update({lab: int(lab in labels) for lab in LABELS})
    return row


def label_tuple(row: dict) -> tuple[int, ...]:
    return tuple(row[lab] for lab in LABELS)


# ---------------------------------------------------------------------------
def generate(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    n_unique = N_ROWS - N_EXACT_DUPLICATES - N_CONFLICTING
    assert sum(n for _, n in PROFILE_COUNTS) == n_unique, "PROFILE_COUNTS must sum to the unique rows"

    rows: list[dict] = []
    seen: dict[str, int] = {}
    for labels, count in PROFILE_COUNTS:
        made = 0
        while made < count:
            comment = make_comment(rng, labels)
            if comment in seen or not MIN_WORDS <= len(comment.split()) <= MAX_WORDS:
                continue
            seen[comment] = len(rows)
            rows.append(row_for(*pick_target(rng, labels), comment, labels))
            made += 1

    # Exact duplicates: same comment and same labels (target may differ, as when the
    # same comment is posted under several people's posts).
    base = list(rows)
    for src in rng.sample(base, N_EXACT_DUPLICATES):
        labels = tuple(lab for lab in LABELS if src[lab])
        gender, profession = (
            (src["Gender"], src["Profession"]) if rng.random() < 0.5 else pick_target(rng, labels)
        )
        rows.append(row_for(gender, profession, src["comment"], labels))

    # Conflicting duplicates: the same text annotated differently (annotator disagreement).
    bully_only = [r for r in base if label_tuple(r) == (1, 0, 0, 0, 0)]
    sexual_only = [r for r in base if label_tuple(r) == (0, 1, 0, 0, 0)]
    bully_threat = [r for r in base if label_tuple(r) == (1, 0, 0, 1, 0)]
    conflicts = [
        (rng.choice(bully_only), ()),                      # bully vs. nothing
        (rng.choice(sexual_only), ("sexual", "spam")),     # sexual vs. sexual+spam
        (rng.choice(bully_threat), ("bully",)),            # bully+threat vs. bully
    ]
    for src, new_labels in conflicts:
        rows.append(row_for(src["Gender"], src["Profession"], src["comment"], new_labels))

    rng.shuffle(rows)
    return rows


def write_csv(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(HEADER), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def summarize(rows: list[dict], out: Path) -> str:
    n = len(rows)
    lines = [f"wrote {out} ({out.stat().st_size / 1024:.1f} KB, {n} rows, SYNTHETIC data)"]
    lines.append("positives per label:")
    for lab in LABELS:
        k = sum(r[lab] for r in rows)
        lines.append(f"  {lab:<10} {k:4d}  ({100 * k / n:.1f}%)")
    by_count = Counter(sum(label_tuple(r)) for r in rows)
    lines.append("rows by number of labels:")
    for k in sorted(by_count):
        lines.append(f"  {k} labels: {by_count[k]:4d}  ({100 * by_count[k] / n:.1f}%)")
    multi = sum(v for k, v in by_count.items() if k >= 2)
    lines.append(f"  >=2 labels: {multi:4d}  ({100 * multi / n:.1f}%)")

    by_text: dict[str, list[tuple[int, ...]]] = {}
    for r in rows:
        by_text.setdefault(r["comment"], []).append(label_tuple(r))
    dup_texts = {t: labs for t, labs in by_text.items() if len(labs) > 1}
    conflicting = [t for t, labs in dup_texts.items() if len(set(labs)) > 1]
    consistent = [t for t, labs in dup_texts.items() if len(set(labs)) == 1]
    lines.append("duplicates:")
    lines.append(f"  unique comment texts:              {len(by_text)}")
    lines.append(f"  texts repeated with same labels:   {len(consistent)} "
                 f"({sum(len(dup_texts[t]) - 1 for t in consistent)} extra rows)")
    lines.append(f"  texts repeated with conflicting labels: {len(conflicting)}")
    for t in conflicting:
        lines.append(f"    {t!r}: {sorted(set(dup_texts[t]))}")
    words = [len(r["comment"].split()) for r in rows]
    lines.append(f"words per comment: min {min(words)}, max {max(words)}, mean {sum(words) / n:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output CSV path")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (default %(default)s)")
    args = parser.parse_args()
    rows = generate(args.seed)
    write_csv(rows, args.out)
    print(summarize(rows, args.out))


if __name__ == "__main__":
    main()
