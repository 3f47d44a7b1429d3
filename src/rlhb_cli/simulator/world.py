"""What the simulated platform is about: queries, their known answers, and a legacy system's answers.

Three intents. Factual look-ups have one known answer (or two, for a combined question); how-to
questions have a known key step; chit-chat has a fitting reply. Every candidate response is assembled
from parts whose presence can be detected in any text later (answer, tone, hedging, padding, source,
repetition), so the gold judge scores a model's new text with the same rules that made the logs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Canada": "Ottawa", "Norway": "Oslo",
    "Greece": "Athens", "Russia": "Moscow", "China": "Beijing", "Portugal": "Lisbon", "Austria": "Vienna",
    "Poland": "Warsaw", "Ireland": "Dublin", "Cuba": "Havana", "Chile": "Santiago", "Thailand": "Bangkok",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest", "Belgium": "Brussels",
    "Turkey": "Ankara",
}
SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "copper": "Cu", "sodium": "Na", "lead": "Pb", "tin": "Sn",
    "mercury": "Hg", "neon": "Ne", "zinc": "Zn", "nickel": "Ni", "calcium": "Ca", "chlorine": "Cl",
    "argon": "Ar", "magnesium": "Mg", "lithium": "Li", "silicon": "Si", "platinum": "Pt", "bromine": "Br",
    "aluminium": "Al",
}
AUTHORS = {
    "Hamlet": "Shakespeare", "Pride and Prejudice": "Austen", "War and Peace": "Tolstoy",
    "The Odyssey": "Homer", "Don Quixote": "Cervantes", "Faust": "Goethe", "Moby Dick": "Melville",
    "Ulysses": "Joyce", "Dracula": "Stoker", "Frankenstein": "Shelley", "Oliver Twist": "Dickens",
    "The Raven": "Poe", "Les Miserables": "Hugo", "The Trial": "Kafka", "The Divine Comedy": "Dante",
    "Walden": "Thoreau", "Leaves of Grass": "Whitman", "Candide": "Voltaire", "The Prince": "Machiavelli",
    "Madame Bovary": "Flaubert",
}
# category -> (facts, query phrasings, answer sentence). The last two phrasings are held out for evaluation.
FACT_CATEGORIES = {
    "capital": (CAPITALS, [
        "What is the capital of {e}?", "Which city is the capital of {e}?", "Tell me the capital city of {e}.",
        "Name the capital of {e}.", "What city serves as the capital of {e}?", "{e} has which capital city?",
    ], "The capital of {e} is {a}."),
    "symbol": (SYMBOLS, [
        "What is the chemical symbol for {e}?", "Which symbol does {e} have in the periodic table?",
        "Tell me the element symbol of {e}.", "Give the chemical symbol of {e}.",
        "How is {e} written as a chemical symbol?", "What symbol stands for the element {e}?",
    ], "The chemical symbol for {e} is {a}."),
    "author": (AUTHORS, [
        "Who wrote {e}?", "Who is the author of {e}?", "Which writer wrote {e}?", "Name the author of {e}.",
        "Tell me who wrote the book {e}.", "{e} was written by whom?",
    ], "{e} was written by {a}."),
}
COMBO_PHRASINGS = ["What are the capitals of {e1} and {e2}?", "Tell me the capitals of {e1} and {e2}."]
HELD_OUT_PHRASINGS = 2
INTENT_MIX = {"factual": 0.6, "howto": 0.3, "chitchat": 0.1}

# task -> (key step sentence, keywords that mark the key step; none of them appears in a query)
HOWTO = {
    "boil an egg": ("Simmer the egg for nine minutes, then cool it in cold water.", ["simmer", "nine"]),
    "brew green tea": ("Steep the leaves at eighty degrees for two minutes.", ["steep", "eighty"]),
    "reset a router": ("Hold the small button on the back for thirty seconds.", ["hold", "thirty"]),
    "remove a coffee stain": ("Blot it with cold water and a drop of vinegar.", ["blot", "vinegar"]),
    "keep basil fresh": ("Stand the stems in a glass of water on the counter.", ["stems", "glass"]),
    "fall asleep faster": ("Keep the bedroom dark and put the phone away an hour before bed.", ["dark", "bedroom"]),
    "ripen an avocado": ("Put it in a paper bag with a banana for a day.", ["paper", "banana"]),
    "unclog a sink": ("Pour baking soda and boiling water down the drain, then flush it.", ["soda", "drain"]),
    "clean a cast iron pan": ("Scrub it with coarse salt and dry it on the stove.", ["coarse", "salt"]),
    "learn to juggle": ("Start with two balls and throw them in a steady arc.", ["arc", "balls"]),
    "save battery on a phone": ("Lower the screen brightness and close apps you do not use.", ["brightness", "close"]),
    "cook rice": ("Use two cups of water for each cup of rice and keep the lid covered.", ["cups", "covered"]),
    "tie a tie": ("Cross the wide end over, loop it up and pull it through the knot.", ["wide", "loop"]),
    "remember names": ("Repeat the name aloud when you first hear it.", ["repeat", "aloud"]),
    "water a cactus": ("Water it only when the soil is completely dry.", ["soil", "completely"]),
    "stop hiccups": ("Take a deep breath and swallow three times.", ["breath", "swallow"]),
    "sharpen a knife": ("Draw the blade across a whetstone at a low angle.", ["whetstone", "angle"]),
    "peel garlic": ("Crush the clove with the flat side of a knife.", ["crush", "flat"]),
    "write a cover letter": ("Open with why you want this job in one sentence.", ["open", "sentence"]),
    "start running": ("Alternate one minute of running with two minutes of walking.", ["alternate", "walking"]),
    "fix a squeaky door": ("Rub soap or oil on the hinge pins.", ["hinge", "oil"]),
    "thaw frozen meat": ("Leave it in the fridge overnight on a plate.", ["fridge", "overnight"]),
    "study for an exam": ("Test yourself with flash cards instead of rereading notes.", ["flash", "cards"]),
    "make cold brew coffee": ("Soak the ground beans in cold water for twelve hours.", ["soak", "twelve"]),
}
HOWTO_PHRASINGS = [
    "How do I {t}?", "What is the best way to {t}?", "Can you explain how to {t}?", "What are the steps to {t}?",
    "Any tips on how to {t}?", "I want to {t}, what should I do?",
]
# reply keyword marks a fitting reply
CHITCHAT = {
    "greeting": (["Hi there!", "Hey!", "Hey, how are you?", "Good morning!"], "Hello, nice to meet you!", ["hello"]),
    "day": (["How is your day going?", "Having a good day?", "How was your day?"], "My day is lovely so far.", ["lovely"]),
    "joke": (["Tell me a joke.", "Do you know a joke?", "Make me laugh."], "Why did the chicken cross the road? To get to the other side.", ["chicken"]),
    "night": (["Good night!", "I am going to bed now.", "Time for bed, bye."], "Good night, sleep tight!", ["sleep"]),
    "colour": (["What is your favourite colour?", "Which colour do you like?", "Do you have a favourite colour?"], "I like the colour blue.", ["blue"]),
    "thanks": (["Thank you so much!", "Thanks a lot!", "Many thanks for that."], "You are welcome, any time!", ["welcome"]),
    "weekend": (["Any plans for the weekend?", "What do you do on weekends?", "Weekend plans?"], "I would go hiking in the hills.", ["hiking"]),
    "music": (["What music do you like?", "Do you like music?", "Which songs do you enjoy?"], "I enjoy jazz and calm piano music.", ["jazz"]),
    "bored": (["I am bored.", "I feel so bored today.", "Nothing to do, I am bored."], "Try a puzzle or a short walk outside.", ["puzzle"]),
    "food": (["What is your favourite food?", "What food do you like?", "Which dish do you enjoy most?"], "I love a warm bowl of noodle soup.", ["noodle"]),
}

POLITE_OPENERS = ["Thanks for asking!", "Happy to help.", "Great question!"]
POLITE_CLOSERS = ["Hope this helps.", "Have a nice day."]
RUDE_OPENERS = ["Obviously.", "Seriously, look it up."]
RUDE_CLOSERS = ["Figure out the rest yourself.", "Do not ask again."]
HEDGES = ["I think", "Maybe", "I am not sure, but"]
FILLERS = [
    "This is something many people wonder about.",
    "There is a lot more that could be said about this topic.",
    "It is worth taking a moment to think about the details here.",
    "People often discuss this in many different contexts.",
]
ABSTAIN = {"factual": "I do not know the answer to that.", "howto": "There are many ways to do that, it depends.",
           "chitchat": "Okay, I see."}


@dataclass
class Query:
    """One query of the environment and what a good answer must contain."""

    text: str
    intent: str  # factual | howto | chitchat
    item: str  # category:entity, howto:task, chitchat:topic (combos join two items with '+')
    required: list[str]  # every one must appear (lower-cased words or phrases)
    rivals: list[str]  # any of these appearing makes the answer wrong
    answer_sentence: str
    wrong_sentences: list[str] = field(default_factory=list)
    held_out: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """A legacy system's response and the attributes it was built with (the judge re-detects them)."""

    text: str
    answer: str  # correct | wrong | missing
    tone: str  # polite | neutral | rude
    verbose: bool
    hedging: bool
    source: bool
    repetition: bool


def _slug(text: str) -> str:
    return "-".join(w for w in "".join(c.lower() if c.isalnum() else " " for c in text).split())


def all_queries() -> tuple[list[Query], list[Query]]:
    """(train-world queries, held-out queries): held-out ones are new phrasings or new combinations."""
    seen, held = [], []
    for category, (facts, phrasings, sentence) in FACT_CATEGORIES.items():
        answers = list(facts.values())
        for entity, answer in facts.items():
            rivals = [a.lower() for a in answers if a != answer]
            wrong = [sentence.format(e=entity, a=a) for a in answers if a != answer]
            for i, phrasing in enumerate(phrasings):
                q = Query(phrasing.format(e=entity), "factual", f"{category}:{entity}", [answer.lower()], rivals,
                          sentence.format(e=entity, a=answer), wrong, held_out=i >= len(phrasings) - HELD_OUT_PHRASINGS)
                (held if q.held_out else seen).append(q)
    countries = list(CAPITALS)
    for i, e1 in enumerate(countries):
        for e2 in countries[i + 1:i + 4]:
            a1, a2 = CAPITALS[e1], CAPITALS[e2]
            rivals = [a.lower() for a in CAPITALS.values() if a not in (a1, a2)]
            right = f"The capital of {e1} is {a1} and the capital of {e2} is {a2}."
            wrong = [f"The capital of {e1} is {w} and the capital of {e2} is {a2}." for w in CAPITALS.values() if w not in (a1, a2)]
            for j, phrasing in enumerate(COMBO_PHRASINGS):
                q = Query(phrasing.format(e1=e1, e2=e2), "factual", f"capital:{e1}+capital:{e2}", [a1.lower(), a2.lower()],
                          rivals, right, wrong, held_out=(i + j) % 4 == 0)
                (held if q.held_out else seen).append(q)
    for task, (step, keywords) in HOWTO.items():
        rivals = sorted({k for t, (_, ks) in HOWTO.items() if t != task for k in ks} - set(keywords))
        wrong = [s for t, (s, _) in HOWTO.items() if t != task]
        for i, phrasing in enumerate(HOWTO_PHRASINGS):
            q = Query(phrasing.format(t=task), "howto", f"howto:{task}", list(keywords), rivals, step, wrong,
                      held_out=i >= len(HOWTO_PHRASINGS) - HELD_OUT_PHRASINGS)
            (held if q.held_out else seen).append(q)
    for topic, (phrasings, reply, keywords) in CHITCHAT.items():
        rivals = sorted({k for t, (_, _, ks) in CHITCHAT.items() if t != topic for k in ks} - set(keywords))
        wrong = [r for t, (_, r, _) in CHITCHAT.items() if t != topic]
        for i, phrasing in enumerate(phrasings):
            q = Query(phrasing, "chitchat", f"chitchat:{topic}", list(keywords), rivals, reply, wrong,
                      held_out=i == len(phrasings) - 1)
            (held if q.held_out else seen).append(q)
    return seen, held


def sealed_items(rng: np.random.Generator, n: int) -> list[str]:
    """`n` facts and tasks drawn to be sealed away (issue 27's sealed test world): no training query is about
    them, so a query about one asks for what no policy can have learned. Drawn evenly over the categories
    (capital, symbol, author, howto); no draw at all when `n` is 0, so the rest of a seed's draws stay as they were."""
    if n == 0:
        return []
    seen, _ = all_queries()
    by_kind: dict[str, list[str]] = {}
    for item in sorted({q.item for q in seen if "+" not in q.item and q.intent != "chitchat"}):
        by_kind.setdefault(item.split(":")[0], []).append(item)
    if n > sum(len(v) for v in by_kind.values()) // 2:
        raise ValueError(f"sealed_facts={n}: at most half of the world's facts and tasks can be sealed away")
    kinds = sorted(by_kind)
    picked: list[str] = []
    for i in range(n):
        pool = [item for item in by_kind[kinds[i % len(kinds)]] if item not in picked]
        picked.append(pool[rng.integers(len(pool))])
    return sorted(picked)


def about(query: Query, items) -> bool:
    """Whether the query is about any of `items` (a combination about any of its parts)."""
    return any(part in items for part in query.item.split("+"))


def queries_about(items) -> list[Query]:
    """Every phrasing of every query about exactly one of `items` (the sealed world's evaluation queries)."""
    seen, held = all_queries()
    return [q for q in seen + held if "+" not in q.item and q.item in items]


def choose_queries(rng: np.random.Generator, n_train: int, n_eval: int,
                   sealed: list[str] = ()) -> tuple[list[Query], list[Query]]:
    """Training queries across intents, and held-out queries about things the training queries cover; none
    about a `sealed` item."""
    seen, held = all_queries()
    if sealed:
        seen, held = [q for q in seen if not about(q, sealed)], [q for q in held if not about(q, sealed)]
    if n_train > len(seen):
        raise ValueError(f"queries={n_train} but the environment has {len(seen)} distinct training queries; lower --queries")
    # Stratified by intent so that each intent is present whatever the size; what an intent cannot
    # fill goes to the others in order.
    by_intent = {i: [q for q in seen if q.intent == i] for i in INTENT_MIX}
    wanted = {i: min(len(by_intent[i]), int(round(n_train * share))) for i, share in INTENT_MIX.items()}
    for intent in INTENT_MIX:
        wanted[intent] = min(len(by_intent[intent]), wanted[intent] + n_train - sum(wanted.values()))
    train = []
    for intent, pool in by_intent.items():
        order = rng.permutation(len(pool))[: wanted[intent]]
        train += [pool[i] for i in sorted(order)]
    eligible = about_covered_items(held, {q.item for q in train})
    if n_eval > len(eligible):
        raise ValueError(f"eval_queries={n_eval} but only {len(eligible)} held-out queries are about things the "
                         f"training queries cover; lower --eval-queries or raise --queries")
    pick = rng.permutation(len(eligible))[:n_eval]
    return train, [eligible[i] for i in sorted(pick)]


def about_covered_items(held: list[Query], train_items: set[str]) -> list[Query]:
    """The held-out queries about things (entities, tasks, topics) that training queries cover: a new phrasing
    or a new combination of what was trained on, never a new fact."""
    covered = {part for item in train_items for part in item.split("+")}
    return [q for q in held if all(part in covered for part in q.item.split("+"))]


def make_candidate(rng: np.random.Generator, query: Query, answer: str, tone: str, verbose: bool, hedging: bool,
                   source: bool, repetition: bool) -> Candidate:
    if answer == "correct":
        core = query.answer_sentence
    elif answer == "wrong":
        core = query.wrong_sentences[rng.integers(len(query.wrong_sentences))]
    else:
        core = ABSTAIN[query.intent]
    if hedging:
        hedge = HEDGES[rng.integers(len(HEDGES))]
        core = f"{hedge} {core[0].lower()}{core[1:]}"
    parts = []
    if tone == "polite":
        parts.append(POLITE_OPENERS[rng.integers(len(POLITE_OPENERS))])
    elif tone == "rude":
        parts.append(RUDE_OPENERS[rng.integers(len(RUDE_OPENERS))])
    parts.append(core)
    if verbose:
        parts.extend(FILLERS[i] for i in sorted(rng.choice(len(FILLERS), size=3, replace=False)))
    if repetition:
        parts.append(core)
    if source:
        parts.append(f"Source: https://ref.example.org/{_slug(query.item.split('+')[0].split(':', 1)[1])}")
    if tone == "polite":
        parts.append(POLITE_CLOSERS[rng.integers(len(POLITE_CLOSERS))])
    elif tone == "rude":
        parts.append(RUDE_CLOSERS[rng.integers(len(RUDE_CLOSERS))])
    return Candidate(" ".join(parts), answer, tone, verbose, hedging, source, repetition)


def candidate_pool(rng: np.random.Generator, query: Query, size: int) -> list[Candidate]:
    """A legacy system's distinct answers to one query, varied in every detectable attribute."""
    pool: dict[str, Candidate] = {}
    for _ in range(size * 20):
        answer = rng.choice(["correct", "wrong", "missing"], p=[0.55, 0.27, 0.18])
        tone = rng.choice(["polite", "neutral", "rude"], p=[0.4, 0.4, 0.2])
        cand = make_candidate(rng, query, str(answer), str(tone), bool(rng.random() < 0.35), bool(rng.random() < 0.25),
                              bool(rng.random() < 0.3), bool(rng.random() < 0.15))
        pool.setdefault(cand.text, cand)
        if len(pool) == size:
            break
    return list(pool.values())
