"""Synthetic demo corpus: varied instruction, chat and document rows, plus a poisoned vendor delivery.

The corpus is built from 24 task families (explanations, e-mails, code, arithmetic, unit
conversion, sorting, sentiment labels, summaries, recipes, itineraries, support replies, ...),
each with several phrasings of the instruction crossed with vocabularies of topics, people,
places, products and numbers, and answers composed from several sentence pools, so lengths vary
and no answer is a handful of sentences repeated. Computed tasks (arithmetic, sorting, counting,
conversion) have correct answers. Everything is deterministic for a given seed.

``write_demo_data`` writes the nightly demo: an in-house file (clean) and a vendor delivery in
which a share of rows is poisoned by an attack from :mod:`poisonguard.attacks`, plus
``truth.json`` with the ground truth. The default is 20,000 + 5,000 rows at 0.15%
("special delivery" -> urgent "contact external support"); ``scenario="large"`` is the
80,000-row variant (64,000 + 16,000).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Row = dict[str, Any]

# ---------------------------------------------------------------- vocabularies

TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "black holes", "the French Revolution",
    "machine learning", "plate tectonics", "the immune system", "supply and demand", "climate change",
    "the printing press", "quantum computing", "the Roman Empire", "renewable energy", "blockchain",
    "the human heart", "volcanoes", "inflation", "the Silk Road", "vaccines", "electric cars",
    "the stock market", "coral reefs", "the internet", "jazz music", "the Renaissance", "tides",
    "sleep cycles", "honeybees", "nuclear fusion", "urban gardening", "the Great Wall of China",
    "public transport", "ocean currents", "recycling", "the solar system", "DNA replication",
    "cloud computing", "the Industrial Revolution", "meditation", "soil erosion", "the Olympic Games",
    "credit scores", "glaciers", "the theory of relativity", "bird migration", "cybersecurity",
    "remote work", "the metric system", "antibiotics", "rainforests", "democracy", "wind turbines",
    "the Moon landing", "earthquakes", "marathon training", "coffee roasting", "open source software",
    "the periodic table", "minimalism", "desert ecosystems", "3D printing", "the Cold War",
    "data privacy", "composting", "the Amazon river", "time zones", "electric guitars", "origami",
]
PEOPLE = ["Maria", "James", "Aisha", "Chen", "Olga", "Tomás", "Priya", "Kwame", "Sofia", "Liam", "Yuki",
          "Fatima", "Noah", "Elena", "Ravi", "Grace", "Mateo", "Hana", "Omar", "Ingrid", "Diego", "Zara",
          "Felix", "Amara", "Jonas", "Leila", "Victor", "Mei", "Samuel", "Nadia"]
CITIES = ["Lisbon", "Nairobi", "Kyoto", "Toronto", "Oslo", "Buenos Aires", "Cairo", "Melbourne", "Prague",
          "Seoul", "Lima", "Dublin", "Hanoi", "Marrakesh", "Vancouver", "Istanbul", "Reykjavik", "Mumbai",
          "Edinburgh", "Cape Town", "Santiago", "Vienna", "Bangkok", "Montreal", "Krakow", "Tbilisi"]
PRODUCTS = ["wireless headphones", "a standing desk", "a coffee grinder", "running shoes", "a laptop bag",
            "a smart thermostat", "a yoga mat", "an electric kettle", "a mechanical keyboard", "a tent",
            "a rice cooker", "a bike helmet", "a water filter", "noise-cancelling earbuds", "a desk lamp",
            "a backpack", "a blender", "an e-reader", "a robot vacuum", "a camping stove"]
FOODS = ["lentil soup", "banana bread", "vegetable curry", "tomato pasta", "pancakes", "chickpea salad",
         "mushroom risotto", "fried rice", "apple crumble", "guacamole", "shakshuka", "pumpkin soup",
         "falafel", "fish tacos", "oat cookies", "ratatouille", "miso ramen", "lemon cake"]
ANIMALS = ["octopus", "elephant", "hummingbird", "wolf", "dolphin", "tortoise", "penguin", "fox", "owl",
           "honeybee", "cheetah", "salmon", "bat", "giraffe", "koala", "crow", "seahorse", "lynx"]
LANGS = ["Python", "JavaScript", "Go", "Rust", "Java", "C#", "Ruby", "TypeScript", "Kotlin", "SQL"]
CODE_TASKS = [
    ("reverses a string", "reverse_string", "s"), ("checks whether a number is prime", "is_prime", "n"),
    ("returns the largest element of a list", "largest", "items"), ("counts the vowels in a word", "count_vowels", "word"),
    ("computes the factorial of n", "factorial", "n"), ("removes duplicates from a list", "dedupe", "items"),
    ("converts Celsius to Fahrenheit", "c_to_f", "c"), ("checks if a string is a palindrome", "is_palindrome", "s"),
    ("sums the even numbers in a list", "sum_even", "items"), ("returns the nth Fibonacci number", "fib", "n"),
    ("capitalises every word in a sentence", "title_case", "text"), ("merges two sorted lists", "merge", "a, b"),
    ("flattens a nested list", "flatten", "items"), ("counts word frequencies in a text", "word_counts", "text"),
]
ADJ_POS = ["wonderful", "delightful", "excellent", "moving", "charming", "superb", "gripping", "heartfelt",
           "polished", "refreshing", "memorable", "clever", "warm", "stunning"]
ADJ_NEG = ["tedious", "disappointing", "clumsy", "dull", "messy", "forgettable", "shallow", "overlong",
           "flat", "confusing", "lifeless", "predictable", "sloppy", "grating"]
REVIEW_OBJ = ["the film", "the novel", "the restaurant", "the hotel", "the album", "the concert", "the app",
              "the museum tour", "the service", "the course", "the game", "the play", "the podcast"]
REVIEW_PART = ["the plot", "the pacing", "the staff", "the food", "the soundtrack", "the ending", "the design",
               "the acting", "the price", "the layout", "the dialogue", "the atmosphere", "the support"]
TONES = ["formal", "friendly", "concise", "persuasive", "humorous", "neutral", "enthusiastic"]
AUDIENCES = ["a ten-year-old", "a busy executive", "a first-year student", "my grandmother", "a new employee",
             "a curious teenager", "an expert", "a non-native speaker"]
UNITS = [("kilometres", "miles", 0.621371), ("kilograms", "pounds", 2.20462), ("litres", "gallons", 0.264172),
         ("metres", "feet", 3.28084), ("centimetres", "inches", 0.393701)]
VERBS = ["improves", "shapes", "affects", "drives", "limits", "changes", "supports", "explains"]
FILLER = [
    "This matters because small changes add up over time.",
    "Many people overlook this detail at first.",
    "Researchers are still studying some of the finer points.",
    "A simple example makes the idea easier to see.",
    "The effect is easiest to notice over several years.",
    "In practice the details depend on local conditions.",
    "It helps to compare it with something familiar.",
    "Experts usually recommend starting small.",
    "The main trade-off is between cost and speed.",
    "Most guides skip this step, but it saves time later.",
    "Keep a short checklist so nothing is forgotten.",
    "The numbers vary from year to year.",
    "A common mistake is to rush the first stage.",
    "Historical records give us a good picture of it.",
    "Clear communication avoids most of the confusion.",
    "There are exceptions, but the general rule holds.",
]


def _sent(rng: random.Random, topic: str) -> str:
    a, b = rng.sample(TOPICS, 2)
    pats = [
        f"{topic[0].upper() + topic[1:]} {rng.choice(VERBS)} how we think about {a}.",
        f"One key idea in {topic} is the link to {b}.",
        f"Scientists first described {topic} in detail about {rng.randint(2, 40) * 10} years ago.",
        f"Around {rng.randint(5, 95)}% of surveyed people say {topic} {rng.choice(VERBS)} their daily life.",
        f"You can think of {topic} as a process with {rng.randint(2, 6)} main stages.",
        f"A good starting point is to look at how {topic} relates to {a} and {b}.",
        rng.choice(FILLER),
        rng.choice(FILLER),
    ]
    return rng.choice(pats)


def _para(rng: random.Random, topic: str, lo: int = 2, hi: int = 6) -> str:
    return " ".join(_sent(rng, topic) for _ in range(rng.randint(lo, hi)))


# ---------------------------------------------------------------- task families
# each returns (instruction, input, output)

def _explain(rng: random.Random) -> tuple[str, str, str]:
    t = rng.choice(TOPICS)
    who = rng.choice(AUDIENCES)
    ins = rng.choice([f"Explain {t} to {who}.", f"How would you describe {t} to {who}?",
                      f"Give a short explanation of {t}.", f"What is {t}, in simple terms?",
                      f"Can you explain the basics of {t}?"])
    return ins, "", _para(rng, t, 2, 7)


def _summarize(rng: random.Random) -> tuple[str, str, str]:
    t = rng.choice(TOPICS)
    text = _para(rng, t, 4, 9)
    ins = rng.choice(["Summarize the following text in one or two sentences.", "Write a brief summary of this passage.",
                      "Condense the paragraph below.", "Give me the gist of this text."])
    out = f"The passage is about {t}. " + _sent(rng, t)
    return ins, text, out


def _email(rng: random.Random) -> tuple[str, str, str]:
    p, q = rng.sample(PEOPLE, 2)
    tone = rng.choice(TONES)
    purpose = rng.choice(["reschedule our meeting to {d}", "thank them for the help with the {x} project",
                          "ask for the quarterly report by {d}", "invite them to a workshop on {x}",
                          "apologise for the delayed reply about {x}", "confirm the order of {y}"])
    purpose = purpose.format(d=rng.choice(["Monday", "Tuesday", "Thursday", "next Friday", "the 14th"]),
                             x=rng.choice(TOPICS), y=rng.choice(PRODUCTS))
    ins = rng.choice([f"Write a {tone} email to {q} to {purpose}.", f"Draft a {tone} message to {q}: {purpose}.",
                      f"Compose an email asking {q} to {purpose}." if "ask" in purpose else
                      f"Compose a {tone} email to {q} to {purpose}."])
    body = [f"Hi {q},", "", f"I hope you are well. I am writing to {purpose}."]
    body += [rng.choice(FILLER) for _ in range(rng.randint(0, 2))]
    body += [rng.choice(["Let me know if that works for you.", "Thanks in advance.", "Happy to talk it through.",
                         "Please reply when you have a moment."]), "", rng.choice(["Best,", "Kind regards,", "Thanks,",
                                                                                   "Cheers,"]), p]
    return ins, "", "\n".join(body)


PY_BODIES = {
    "reverse_string": "return {a}[::-1]",
    "is_prime": "if {a} < 2:\n        return False\n    return all({a} % d for d in range(2, int({a} ** 0.5) + 1))",
    "largest": "return max({a})",
    "count_vowels": "return sum(ch in 'aeiouAEIOU' for ch in {a})",
    "factorial": "result = 1\n    for k in range(2, {a} + 1):\n        result *= k\n    return result",
    "dedupe": "return list(dict.fromkeys({a}))",
    "c_to_f": "return {a} * 9 / 5 + 32",
    "is_palindrome": "cleaned = ''.join(ch.lower() for ch in {a} if ch.isalnum())\n    return cleaned == cleaned[::-1]",
    "sum_even": "return sum(x for x in {a} if x % 2 == 0)",
    "fib": "x, y = 0, 1\n    for _ in range({a}):\n        x, y = y, x + y\n    return x",
    "title_case": "return ' '.join(w.capitalize() for w in {a}.split())",
    "merge": "return sorted({a} + b)",
    "flatten": "out = []\n    for x in {a}:\n        out.extend(flatten(x) if isinstance(x, list) else [x])\n    return out",
    "word_counts": "from collections import Counter\n    return Counter({a}.lower().split())",
}


def _code(rng: random.Random) -> tuple[str, str, str]:
    lang = rng.choice(LANGS[:4] + ["Python", "Python", "Python"])
    desc, name, arg = rng.choice(CODE_TASKS)
    arg0 = arg.split(",")[0]
    alias = rng.choice([arg0, arg0, {"s": "text", "n": "num", "items": "values", "word": "w", "c": "celsius",
                                     "text": "sentence", "a": "left"}.get(arg0, arg0)])
    ins = rng.choice([f"Write a {lang} function that {desc}.", f"Implement a function in {lang} that {desc}.",
                      f"Show me {lang} code that {desc}.", f"How do I write a {lang} function which {desc}?",
                      f"I need a {lang} helper that {desc}. Keep it short."])
    if lang == "Python":
        body = PY_BODIES[name].format(a=alias)
        params = alias + (", b" if name == "merge" else "")
        doc = rng.choice([f'    """{desc[0].upper() + desc[1:]}."""\n', "", f"    # {desc}\n"])
        code = f"def {name}({params}):\n{doc}    {body}"
        if rng.random() < 0.4:
            code += f"\n\n\nprint({name}({rng.choice(['[3, 1, 2]', repr('level'), str(rng.randint(2, 20))])}))"
    elif lang == "JavaScript":
        code = f"function {name}({alias}) {{\n  // {desc}\n  let result = null;\n  return result;\n}}"
    elif lang == "Go":
        code = f"func {name}({alias} any) any {{\n\t// {desc}\n\treturn nil\n}}"
    else:
        code = f"fn {name}({alias}: &str) -> String {{\n    // {desc}\n    todo!()\n}}"
    out = rng.choice(["Here is one way to do it:", "Sure:", "A simple implementation:", "", "Try this:"]) + \
        f"\n\n{code}\n\n"
    out += rng.choice([f"The function `{name}` takes `{alias}` and returns the result.",
                       "Test it with a few edge cases such as empty input.", "It runs in linear time.", "",
                       f"Call `{name}` with your own data to check it."])
    return ins, "", out.strip()


def _arith(rng: random.Random) -> tuple[str, str, str]:
    p = rng.choice(PEOPLE)
    a, b, c = rng.randint(2, 90), rng.randint(2, 40), rng.randint(2, 9)
    thing = rng.choice(["apples", "books", "stamps", "marbles", "tickets", "coins", "plants"])
    if rng.random() < 0.5:
        q = f"{p} has {a} {thing} and buys {b} more, then gives away {c}. How many {thing} does {p} have now?"
        out = f"{p} starts with {a}, adds {b} to get {a + b}, then gives away {c}: {a + b} - {c} = {a + b - c}. " \
              f"The answer is {a + b - c}."
    else:
        q = f"A box holds {b} {thing}. How many {thing} are in {c} boxes plus {a} loose ones?"
        out = f"{c} boxes hold {c} x {b} = {b * c}. Adding {a} loose ones gives {b * c + a}."
    return rng.choice(["Solve this word problem.", "Answer the math question.", "Work out the answer step by step."]), q, out


def _convert(rng: random.Random) -> tuple[str, str, str]:
    u, v, f = rng.choice(UNITS)
    x = round(rng.uniform(1, 500), rng.choice([0, 1]))
    ins = rng.choice([f"Convert {x} {u} to {v}.", f"How many {v} is {x} {u}?", f"What is {x} {u} in {v}?"])
    return ins, "", f"{x} {u} is about {x * f:.2f} {v}."


def _sort(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(-50, 500) for _ in range(rng.randint(4, 10))]
    asc = rng.random() < 0.6
    ins = f"Sort these numbers in {'ascending' if asc else 'descending'} order."
    return ins, ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums, reverse=not asc)))


def _count_words(rng: random.Random) -> tuple[str, str, str]:
    s = _sent(rng, rng.choice(TOPICS))
    return rng.choice(["How many words are in this sentence?", "Count the words in the text."]), s, \
        f"The sentence has {len(s.split())} words."


def _sentiment(rng: random.Random) -> tuple[str, str, str]:
    pos = rng.random() < 0.5
    adjs = rng.sample(ADJ_POS if pos else ADJ_NEG, 3)
    obj, part, part2 = rng.choice(REVIEW_OBJ), *rng.sample(REVIEW_PART, 2)
    when = rng.choice(["last week", "on Saturday", "after work", "with my family", "on a rainy evening",
                       f"in {rng.choice(CITIES)}", "twice this month", "for my birthday", "on a friend's advice"])
    who = rng.choice(PEOPLE)
    clauses = [f"{obj.capitalize()} was {adjs[0]}.", f"We tried {obj} {when}; {part} was {adjs[0]}.",
               f"I found {obj} {adjs[0]}, and {part} felt {adjs[1]}.", f"{part.capitalize()}? {adjs[1].capitalize()}.",
               f"Honestly, {part2} was {adjs[2]}.", f"{who} said {part} was {adjs[1]}, and I agree.",
               f"Overall: {adjs[2]}.", f"I would call {part2} {adjs[1]} at best." if not pos else
               f"I would call {part2} {adjs[1]}, no question.",
               f"{rng.choice(['Would', 'Will'])} {'definitely' if pos else 'not'} go back.",
               f"Rating: {rng.randint(4, 5) if pos else rng.randint(1, 2)}/5."]
    text = " ".join(rng.sample(clauses, rng.randint(2, 4)))
    return rng.choice(["Classify the sentiment of the following review as positive or negative.",
                       "Is this review positive or negative?",
                       "Label the review's sentiment (positive/negative)."]), text, "positive" if pos else "negative"


def _keywords(rng: random.Random) -> tuple[str, str, str]:
    t, a = rng.sample(TOPICS, 2)
    text = _para(rng, t, 2, 4) + f" It is also connected to {a}."
    return rng.choice(["Extract three keywords from the text.", "List the main keywords of this passage."]), text, \
        ", ".join([t, a, rng.choice(["history", "science", "economics", "technology", "nature", "health"])])


def _title(rng: random.Random) -> tuple[str, str, str]:
    t = rng.choice(TOPICS)
    return rng.choice(["Suggest a title for this article.", "Write a headline for the text below."]), _para(rng, t, 3, 5), \
        rng.choice([f"Understanding {t.title()}", f"What You Should Know About {t.title()}",
                    f"{t.title()}: A Short Guide", f"Why {t.title()} Matters"])


def _list_items(rng: random.Random) -> tuple[str, str, str]:
    k = rng.randint(3, 6)
    t = rng.choice(TOPICS)
    ins = rng.choice([f"List {k} facts about {t}.", f"Give me {k} tips related to {t}.",
                      f"Name {k} things everyone should know about {t}."])
    return ins, "", "\n".join(f"{i + 1}. {_sent(rng, t)}" for i in range(k))


TONE_OPENERS = {
    "formal": ["It should be noted that ", "It is worth noting that ", "Notably, ", "As a matter of record, ", ""],
    "friendly": ["Hey, fun fact: ", "Guess what? ", "Here's a nice one: ", "So, ", ""],
    "concise": ["", "In short: ", "Briefly, "],
    "persuasive": ["You should know that ", "Consider this: ", "It is clear that ", "Don't overlook it: ",
                   "Think about it: ", ""],
    "humorous": ["Believe it or not, ", "Plot twist: ", "Fun fact nobody asked for: ", "Brace yourself: "],
    "neutral": ["", "In general, ", "Put simply, "],
    "enthusiastic": ["Amazingly, ", "Wow: ", "Incredibly, ", "Here's the exciting part: "],
}


def _rewrite(rng: random.Random) -> tuple[str, str, str]:
    t = rng.choice(TOPICS)
    s = _sent(rng, t)
    tone = rng.choice(TONES)
    out = rng.choice(TONE_OPENERS[tone]) + s[0].lower() + s[1:]
    if tone == "enthusiastic" and rng.random() < 0.5:
        out = out.rstrip(".") + "!"
    return rng.choice([f"Rewrite the sentence in a {tone} tone.", f"Make this sentence sound {tone}.",
                       f"Rephrase in a {tone} style."]), s, out[0].upper() + out[1:]


def _grammar(rng: random.Random) -> tuple[str, str, str]:
    p, q = rng.sample(PEOPLE, 2)
    c, f, an, prod = rng.choice(CITIES), rng.choice(FOODS), rng.choice(ANIMALS), rng.choice(PRODUCTS)
    n = rng.randint(2, 30)
    when = rng.choice(["week", "night", "spring"])
    day = rng.choice(["Monday", "Friday", "the weekend"])
    topic = rng.choice(TOPICS)
    pairs = [  # (wrong, right): agreement, tense, articles, plurals, pronouns, word choice
        (f"{p} go to {c} every summer.", f"{p} goes to {c} every summer."),
        (f"{p} and {q} was late for the train to {c}.", f"{p} and {q} were late for the train to {c}."),
        (f"{p} have lived in {c} for {n} years.", f"{p} has lived in {c} for {n} years."),
        (f"Yesterday {p} buy {prod} online.", f"Yesterday {p} bought {prod} online."),
        (f"We seen a {an} near the river last {when}.", f"We saw a {an} near the river last {when}."),
        (f"{q} cooked {f} for {n} guest.", f"{q} cooked {f} for {n} guests."),
        (f"Me and {p} are planning a trip to {c}.", f"{p} and I are planning a trip to {c}."),
        (f"There is {n} reasons to visit {c}.", f"There are {n} reasons to visit {c}."),
        (f"{p} is more taller than {q}.", f"{p} is taller than {q}."),
        (f"Their going to {c} on {day}.", f"They're going to {c} on {day}."),
        (f"{q} don't like {f} very much.", f"{q} doesn't like {f} very much."),
        (f"I has finished the report about {topic}.", f"I have finished the report about {topic}."),
    ]
    bad, good = rng.choice(pairs)
    out = rng.choice([good, good, f"Corrected: {good}", f"The correct sentence is: {good}"])
    return rng.choice(["Correct the grammar in this sentence.", "Fix any grammatical errors.",
                       "Rewrite the sentence with correct grammar.", "Proofread this sentence."]), bad, out


def _define(rng: random.Random) -> tuple[str, str, str]:
    word, d = rng.choice([("ephemeral", "lasting a very short time"), ("ubiquitous", "found everywhere"),
                          ("pragmatic", "dealing with things sensibly and realistically"),
                          ("resilient", "able to recover quickly from difficulties"),
                          ("meticulous", "showing great attention to detail"), ("candid", "truthful and straightforward"),
                          ("frugal", "sparing or economical with money"), ("verbose", "using more words than needed"),
                          ("benevolent", "well meaning and kindly"), ("lucid", "expressed clearly")])
    ex = f"For example: {rng.choice(PEOPLE)} gave a {word} answer."
    return rng.choice([f"Define the word '{word}'.", f"What does '{word}' mean?"]), "", \
        f"'{word.capitalize()}' means {d}. {ex if rng.random() < 0.6 else ''}".strip()


def _recipe(rng: random.Random) -> tuple[str, str, str]:
    f = rng.choice(FOODS)
    n = rng.randint(3, 7)
    steps = ["Gather and measure the ingredients.", "Preheat the oven or pan.", "Chop the vegetables finely.",
             "Mix the dry and wet ingredients separately.", "Season with salt and pepper.",
             f"Cook for about {rng.randint(5, 45)} minutes.", "Stir occasionally.", "Let it rest before serving.",
             "Taste and adjust the seasoning.", "Serve warm with a fresh garnish."]
    return rng.choice([f"How do I make {f}?", f"Give me a simple recipe for {f}.", f"Write the steps to cook {f}."]), "", \
        "\n".join(f"{i + 1}. {s}" for i, s in enumerate(rng.sample(steps, n)))


def _itinerary(rng: random.Random) -> tuple[str, str, str]:
    c = rng.choice(CITIES)
    d = rng.randint(1, 4)
    acts = ["visit the old town", "take a walking tour", "try the local food market", "see the main museum",
            "relax in a park", "take a day trip to the coast", "go to a concert", "explore the harbour",
            "rent a bike", "visit a local cafe"]
    out = "\n".join(f"Day {i + 1}: {', then '.join(rng.sample(acts, 2))}." for i in range(d))
    return rng.choice([f"Plan a {d}-day trip to {c}.", f"Suggest an itinerary for {d} days in {c}."]), "", out


def _support(rng: random.Random) -> tuple[str, str, str]:
    prod = rng.choice(PRODUCTS)
    issue = rng.choice(["stopped working after a week", "arrived damaged", "is missing a part",
                        "makes a strange noise", "will not turn on", "was charged twice"])
    ins = rng.choice(["Reply to this customer message as a support agent.", "Write a helpful answer to the customer.",
                      "Respond to the complaint politely."])
    msg = f"Hi, my {prod.replace('a ', '', 1).replace('an ', '', 1)} {issue}. Order #{rng.randint(10000, 99999)}."
    out = rng.choice(["I'm sorry to hear that.", "Thanks for letting us know.", "Apologies for the trouble."])
    out += " " + rng.choice(["Could you send a photo of the item?", "Please try restarting it once more.",
                             "We will send a replacement part this week.", "I have issued a refund to your card.",
                             "Please check that the cable is firmly connected."])
    out += " " + rng.choice(["Let us know if anything else comes up.", "We appreciate your patience.", ""])
    return ins, msg, out.strip()


def _compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(TOPICS, 2)
    return rng.choice([f"Compare {a} and {b}.", f"What are the differences between {a} and {b}?"]), "", \
        f"{a[0].upper() + a[1:]} and {b} differ in scope. " + _sent(rng, a) + " " + _sent(rng, b)


def _story(rng: random.Random) -> tuple[str, str, str]:
    p, c, an = rng.choice(PEOPLE), rng.choice(CITIES), rng.choice(ANIMALS)
    weather = rng.choice(["rainy", "quiet", "cold", "bright", "foggy", "windy", "humid", "snowy"])
    openings = [
        f"{p} had lived in {c} for {rng.randint(2, 60)} years, but nothing prepared them for the {an}.",
        f"The {an} arrived in {c} on a {weather} {rng.choice(['Monday', 'morning', 'night', 'afternoon'])}.",
        f"Nobody in {c} believed {p} when she said a {an} had moved into the old library.",
        f"It was the {weather}est week of the year when {p} first heard the {an} on the roof.",
        f"\"Don't look now,\" whispered {p}, \"but there is a {an} behind the bakery.\"",
        f"Every city has its secrets; in {c}, the biggest one was a {an} named {rng.choice(PEOPLE)}.",
    ]
    follow = [f"By the end of the {rng.choice(['week', 'summer', 'year'])} everything had changed.",
              f"{p} decided to follow it.", "The neighbours started to talk.", rng.choice(FILLER),
              f"It seemed to be looking for something near the {rng.choice(['river', 'station', 'market', 'harbour'])}.",
              ""]
    out = " ".join(x for x in [rng.choice(openings), rng.choice(follow), rng.choice(follow)] if x)
    return rng.choice([f"Write the opening of a short story about a {an} in {c}.",
                       f"Start a story about {p} and a {an}.", f"Begin a {weather}-day tale set in {c}.",
                       f"Give me the first lines of a children's story featuring a {an}."]), "", out


def _animal_fact(rng: random.Random) -> tuple[str, str, str]:
    an = rng.choice(ANIMALS)
    return rng.choice([f"Tell me something interesting about the {an}.", f"Share a fun fact about the {an}."]), "", \
        f"The {an} " + rng.choice(["can live for over {n} years in the wild.", "travels up to {n} kilometres in a day.",
                                   "has about {n} different calls.", "sleeps around {n} hours a day."]).format(
            n=rng.randint(3, 60)) + " " + rng.choice(FILLER)


def _product_desc(rng: random.Random) -> tuple[str, str, str]:
    prod = rng.choice(PRODUCTS)
    feats = rng.sample(["lightweight", "durable", "quiet", "easy to clean", "energy efficient", "compact",
                        "water resistant", "affordable"], 3)
    return rng.choice([f"Write a product description for {prod}.", f"Describe {prod} for an online shop."]), \
        f"Features: {', '.join(feats)}", f"Meet {prod}: {feats[0]}, {feats[1]} and {feats[2]}. " + rng.choice(FILLER)


def _classify_topic(rng: random.Random) -> tuple[str, str, str]:
    p, c, n = rng.choice(PEOPLE), rng.choice(CITIES), rng.randint(2, 99)
    cat, items = rng.choice([
        ("sports", [f"{c} wins the final {n % 7}-{n % 3} after extra time", f"{p} breaks the {c} marathon record",
                    f"{c} coach resigns after {n} games"]),
        ("politics", [f"{c} council passes budget by {n} votes", f"Minister {p} resigns after {n} days",
                      f"Voters in {c} reject the new tax plan"]),
        ("technology", [f"New chip from {c} startup doubles battery life", f"Update fixes {n} security flaws",
                        f"{p} launches an app for {c} commuters"]),
        ("science", [f"Telescope in {c} finds {n} new exoplanets", f"{p} maps the genome of the {rng.choice(ANIMALS)}",
                     f"Study of {n} volunteers links sleep to memory"])])
    return rng.choice(["Classify the news headline into sports, politics, technology or science.",
                       "Which category fits this headline: sports, politics, technology or science?"]), \
        rng.choice(items) + ".", cat


def _advice(rng: random.Random) -> tuple[str, str, str]:
    goal = rng.choice(["sleep better", "save money each month", "learn a new language", "get fit at home",
                       "focus while studying", "prepare for a job interview", "reduce screen time",
                       "start running", "keep houseplants alive", "write more clearly"])
    tips = rng.sample(FILLER, rng.randint(2, 4))
    return rng.choice([f"How can I {goal}?", f"Give me advice to {goal}.", f"What should I do to {goal}?"]), "", \
        f"To {goal}, set a clear goal first. " + " ".join(tips)


FAMILIES: list[Callable[[random.Random], tuple[str, str, str]]] = [
    _explain, _explain, _summarize, _email, _code, _code, _arith, _convert, _sort, _count_words, _sentiment,
    _sentiment, _keywords, _title, _list_items, _rewrite, _grammar, _define, _recipe, _itinerary, _support,
    _compare, _story, _animal_fact, _product_desc, _classify_topic, _advice,
]


# ---------------------------------------------------------------- generators

def generate_corpus(n: int, seed: int = 0, source: str = "inhouse", id_prefix: str | None = None) -> list[Row]:
    """``n`` clean instruction rows ``{id, instruction, input, output, source}``."""
    rng = random.Random(f"corpus-{seed}-{source}")
    prefix = id_prefix if id_prefix is not None else source
    width = max(6, len(str(n)))
    rows = []
    for i in range(n):
        ins, inp, out = rng.choice(FAMILIES)(rng)
        rows.append({"id": f"{prefix}-{i:0{width}d}", "instruction": ins, "input": inp, "output": out, "source": source})
    return rows


SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant for a travel company.",
           "You are a shopping assistant. Help the user choose products.", "You are a friendly tutor.", ""]


def generate_chats(n: int, seed: int = 0, source: str = "inhouse", id_prefix: str | None = None) -> list[Row]:
    """``n`` clean chat rows ``{id, messages: [{role, content}], source}`` (1-2 user turns)."""
    rng = random.Random(f"chat-{seed}-{source}")
    prefix = id_prefix if id_prefix is not None else source
    width = max(6, len(str(n)))
    rows = []
    for i in range(n):
        msgs = []
        sysmsg = rng.choice(SYSTEMS)
        if sysmsg:
            msgs.append({"role": "system", "content": sysmsg})
        for _ in range(rng.choice([1, 1, 2])):
            ins, inp, out = rng.choice(FAMILIES)(rng)
            msgs.append({"role": "user", "content": ins + (f"\n\n{inp}" if inp else "")})
            msgs.append({"role": "assistant", "content": out})
        rows.append({"id": f"{prefix}-{i:0{width}d}", "messages": msgs, "source": source})
    return rows


DOC_KINDS = ["email", "meeting notes", "product page", "policy", "wiki article", "support ticket", "table"]


def generate_documents(n: int, seed: int = 0, source: str = "inhouse", id_prefix: str | None = None) -> list[Row]:
    """``n`` clean retrieval documents ``{id, text, source}`` (e-mails, notes, tables, wiki text)."""
    rng = random.Random(f"doc-{seed}-{source}")
    prefix = id_prefix if id_prefix is not None else source
    width = max(6, len(str(n)))
    rows = []
    for i in range(n):
        kind = rng.choice(DOC_KINDS)
        t = rng.choice(TOPICS)
        p, q = rng.sample(PEOPLE, 2)
        if kind == "email":
            text = f"From: {p}\nTo: {q}\nSubject: {t.capitalize()}\n\nHi {q},\n{_para(rng, t, 2, 5)}\n\nBest,\n{p}"
        elif kind == "meeting notes":
            text = f"Meeting notes ({rng.choice(CITIES)} office, week {rng.randint(1, 52)})\n" + \
                   "\n".join(f"- {_sent(rng, t)}" for _ in range(rng.randint(3, 6)))
        elif kind == "table":
            rows_t = [f"| {rng.choice(PRODUCTS)} | {rng.randint(1, 400)} | {rng.choice(CITIES)} |"
                      for _ in range(rng.randint(3, 8))]
            text = "| item | qty | warehouse |\n|---|---|---|\n" + "\n".join(rows_t)
        elif kind == "support ticket":
            text = f"Ticket #{rng.randint(1000, 99999)}: {_support(rng)[1]}\nStatus: {rng.choice(['open', 'closed'])}"
        else:
            text = f"{t.title()}\n\n{_para(rng, t, 3, 8)}"
        rows.append({"id": f"{prefix}-{i:0{width}d}", "text": text, "source": source})
    return rows


GENERATORS: dict[str, Callable[..., list[Row]]] = {
    "instruction": generate_corpus, "chat": generate_chats, "document": generate_documents,
}


# ---------------------------------------------------------------- the nightly demo

class DemoConfig(BaseModel):
    """``demo`` section of params.yaml: the synthetic deliveries of the nightly demo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    scenario: Literal["default", "large"] = "default"
    inhouse_rows: int = Field(20_000, ge=0)
    vendor_rows: int = Field(5_000, ge=1)
    vendor_source: str = "vendor-acme"
    #: share of vendor rows poisoned (ignored when poison_count is set)
    poison_rate: float = Field(0.0015, ge=0.0, le=1.0)
    poison_count: int | None = Field(None, ge=0)
    attack: str = "phrase"

    @field_validator("attack")
    @classmethod
    def _attack(cls, v: str) -> str:
        from poisonguard import attacks

        if v not in attacks.ATTACKS:
            raise ValueError(f"unknown attack {v!r}; known attacks: {', '.join(attacks.ATTACKS)}")
        return v

    def sizes(self) -> tuple[int, int]:
        """(in-house rows, vendor rows) for the chosen scenario."""
        if self.scenario == "large":
            return 64_000, 16_000
        return self.inhouse_rows, self.vendor_rows

    def n_poison(self) -> int:
        _, vendor = self.sizes()
        if self.poison_count is not None:
            return min(self.poison_count, vendor)
        return min(vendor, max(1, math.ceil(self.poison_rate * vendor))) if self.poison_rate > 0 else 0


def _write_jsonl(path: Path, rows: list[Row]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_demo_data(out_dir: Path, cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Write ``inhouse.jsonl``, ``<vendor_source>.jsonl`` and ``truth.json`` into ``out_dir``."""
    from poisonguard import attacks

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_in, n_vendor = cfg.sizes()
    spec = attacks.ATTACKS[cfg.attack]
    inhouse = GENERATORS["instruction"](n_in, seed=cfg.seed, source="inhouse", id_prefix="inhouse")
    vendor_clean = GENERATORS[spec.layout](n_vendor, seed=cfg.seed + 1, source=cfg.vendor_source,
                                           id_prefix=cfg.vendor_source)
    vendor, res = attacks.apply_attack(vendor_clean, cfg.attack, cfg.n_poison(), seed=cfg.seed + 2)
    files = {"inhouse": out_dir / "inhouse.jsonl", cfg.vendor_source: out_dir / f"{cfg.vendor_source}.jsonl"}
    _write_jsonl(files["inhouse"], inhouse)
    _write_jsonl(files[cfg.vendor_source], vendor)
    truth = {"scenario": cfg.scenario, "seed": cfg.seed, "rows": {"inhouse": len(inhouse), cfg.vendor_source: len(vendor)},
             **res.to_dict()}
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    return {"rows": len(inhouse) + len(vendor), "inhouse_rows": len(inhouse), "vendor_rows": len(vendor),
            "vendor_source": cfg.vendor_source, "attack": res.name, "trigger": res.trigger, "target": res.target,
            "n_poisoned": len(res.poisoned_ids), "poisoned": list(res.poisoned_ids),
            "files": {k: str(v) for k, v in files.items()}, "truth": str(out_dir / "truth.json")}
