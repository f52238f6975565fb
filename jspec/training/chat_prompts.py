"""Chat instructions for distilling a drafter from a chat target, built from material on every machine.

A drafter should see the kind of requests it will draft answers to (writing, role play, reasoning,
math, code, extraction, science and humanities questions, translation, summarisation, question
answering over a passage), but the evaluation prompts (Spec-Bench) must never be trained on. These
instructions come from three sources, all licensed for the use:

- task templates written here over seed lists of topics written here;
- passages of the Python standard library's docstrings and source (PSF licence), split
  train/held-out by file like every corpus in `jspec.training.corpus`, as material to summarise,
  translate, extract from, answer questions about and explain;
- arithmetic word problems with random numbers.

`chat_instructions(split, n, seed)` is deterministic: the same arguments give the same list on any
machine with the same Python version. Each item is `{"category": ..., "text": ...}`.
"""

from __future__ import annotations

import ast
import collections
import functools
import random
import re
import textwrap

from jspec.training.corpus import STDLIB, Document, read_corpus, split_corpus

CATEGORIES = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
    "translation", "summarization", "qa", "rag", "math_reasoning",
)  # fmt: skip

TOPICS = (
    "the ocean", "a small mountain village", "autumn leaves", "city life at night", "a lost dog finding its way home",
    "friendship", "learning to ride a bicycle", "a rainy Monday morning", "the first day at a new school",
    "a lighthouse keeper", "space exploration", "a garden in spring", "an old library", "a train journey",
    "a street market", "a snowstorm", "the desert at sunrise", "a busy kitchen", "a chess tournament",
    "a robot learning to paint", "grandparents' stories", "a music festival", "climate change", "recycling",
    "healthy breakfast habits", "working from home", "a trip to Japan", "a visit to a museum", "coffee",
    "the history of bicycles", "volunteering", "a family reunion", "honeybees", "the moon landing",
    "a forest after rain", "learning a new language", "video games", "a marathon", "electric cars",
    "time management", "a birthday surprise", "a thunderstorm", "the first snow", "a haunted house",
    "a fishing trip", "the importance of sleep", "public libraries", "a bakery", "solar energy", "kindness",
)  # fmt: skip

WRITING = (
    "Write a short poem about {topic}.",
    "Write a short story about {topic}.",
    "Write a blog post about {topic}.",
    "Write a persuasive paragraph about {topic}.",
    "Write a haiku about {topic}.",
    "Write a product description for something related to {topic}.",
    "Write an email to a friend telling them about {topic}.",
    "Write a diary entry about {topic}.",
    "Write the opening paragraph of a novel about {topic}.",
    "Write a speech for a school assembly about {topic}.",
    "Write a limerick about {topic}.",
    "Write a news article about {topic}.",
    "Give me five creative titles for an essay about {topic}.",
    "Write a letter to the editor about {topic}.",
    "Describe {topic} in vivid detail.",
)
ROLES = (
    "a pirate captain", "a medieval knight", "a tour guide in Rome", "a friendly librarian", "a detective",
    "a chef in a busy restaurant", "a travel agent", "a personal trainer", "a museum curator", "an astronaut",
    "a wise old wizard", "a customer support agent", "a history teacher", "a park ranger", "a barista",
    "a journalist", "a ship's navigator", "a gardener", "a science fiction writer", "a job interviewer",
)  # fmt: skip
ROLEPLAY = (
    "Pretend you are {role}. Introduce yourself and describe your day.",
    "You are {role}. A visitor asks you about {topic}. What do you say?",
    "Act as {role} and give me advice about {topic}.",
    "Imagine you are {role}. Tell me a story about {topic}.",
    "Role-play as {role} answering this question: what is the best part of your job?",
)
SUBJECTS_STEM = (
    "photosynthesis", "gravity", "the water cycle", "DNA", "black holes", "the speed of light", "volcanoes",
    "electric circuits", "the immune system", "plate tectonics", "the periodic table", "evolution",
    "magnetism", "the greenhouse effect", "cells", "vaccines", "the Pythagorean theorem", "prime numbers",
    "probability", "machine learning", "the internet", "batteries", "sound waves", "chemical reactions",
    "the solar system", "bacteria", "nuclear energy", "weather forecasting", "rainbows", "tides",
)  # fmt: skip
SUBJECTS_HUMANITIES = (
    "the Renaissance", "the Roman Empire", "democracy", "the Industrial Revolution", "ancient Egypt",
    "the printing press", "philosophy", "the French Revolution", "world religions", "Shakespeare",
    "the Silk Road", "human rights", "economics", "the Cold War", "the history of writing", "music history",
    "architecture", "mythology", "the role of art in society", "ethics", "supply and demand", "inflation",
    "the United Nations", "colonialism", "the history of medicine",
)  # fmt: skip
EXPLAIN = (
    "Explain {subject} in simple terms.",
    "What is {subject}? Give an example.",
    "Why is {subject} important?",
    "Explain {subject} to a ten-year-old.",
    "Give me three interesting facts about {subject}.",
    "What are the main ideas behind {subject}?",
    "How would you teach {subject} to a beginner?",
    "Compare {subject} and {other}.",
    "Write a short quiz with answers about {subject}.",
    "Summarize the history of {subject}.",
)
REASONING = (
    "If all {a} are {b} and some {b} are {c}, can we conclude that some {a} are {c}? Explain your reasoning.",
    "{n1} people are in a room. Each person shakes hands with every other person once. How many handshakes are there?",
    "A farmer has {n1} sheep. All but {n2} run away. How many are left? Explain.",
    "I have {n1} apples. I eat {n2} and buy twice as many as I ate. How many apples do I have now?",
    "Which is heavier, a kilogram of {a} or a kilogram of {b}? Explain.",
    "Tom is taller than Ann. Ann is taller than Bob. Who is the shortest? Explain.",
    "A clock shows {h}:00. What angle do the hour and minute hands make?",
    "What comes next in the sequence {s}? Explain the pattern.",
    "If it takes {n1} machines {n1} minutes to make {n1} widgets, how long would it take {n2} machines to make {n2} widgets?",
    "Give me a riddle about {topic} and its answer.",
    "What are the pros and cons of {topic}? Think step by step.",
)
THINGS = ("cats", "dogs", "birds", "apples", "cars", "books", "teachers", "students", "flowers", "feathers", "bricks", "stones")
CODING_TASKS = (
    "reverses a string", "checks whether a number is prime", "computes the factorial of n", "sorts a list of numbers",
    "counts the vowels in a string", "finds the largest element of a list", "merges two sorted lists",
    "removes duplicates from a list", "checks whether a string is a palindrome", "computes Fibonacci numbers",
    "reads a text file and counts its words", "converts Celsius to Fahrenheit", "flattens a nested list",
    "finds the most common word in a text", "computes the average of a list", "checks if two strings are anagrams",
    "implements binary search", "parses a CSV line", "returns the n-th prime", "groups words by their first letter",
    "validates an email address", "computes the greatest common divisor", "transposes a matrix",
    "implements a simple stack class", "finds all divisors of a number",
)  # fmt: skip
CODING = (
    "Write a Python function that {task}.",
    "Write a function in JavaScript that {task}.",
    "How do I write a program that {task}? Show the code.",
    "Write a Python function that {task}, with a docstring and an example.",
    "Write a C function that {task}.",
)
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Chinese", "Japanese", "Russian", "Dutch")
SENTENCES = (
    "The weather is nice today.", "Where is the train station?", "I would like a cup of coffee, please.",
    "My brother works in a hospital.", "We are going to the beach tomorrow.", "This book is very interesting.",
    "Can you help me find my keys?", "The children are playing in the park.", "I have been learning to cook.",
    "The meeting starts at nine o'clock.", "She sings beautifully.", "How much does this cost?",
    "Thank you for your help.", "It is raining again.", "The museum is closed on Mondays.",
)  # fmt: skip


_DEFINITIONS = (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)
_BLOCKS = frozenset(("body", "handlers", "orelse", "finalbody", "cases"))  # the fields that hold statements


def _definitions(tree: ast.AST) -> list[ast.AST]:
    """The function and class definitions under `tree`, in `ast.walk`'s breadth-first order. Only
    statement blocks are searched: expressions hold no definitions, and they are most of the nodes
    (walking them all took about 20 s over the standard library)."""
    found, queue = [], collections.deque([tree])
    while queue:
        node = queue.popleft()
        if isinstance(node, _DEFINITIONS):
            found.append(node)
        for field in node._fields:
            children = getattr(node, field) if field in _BLOCKS else None
            if isinstance(children, list):
                queue.extend(children)
    return found


def _python_passages(docs: list[Document]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(docstrings, function sources) of the documents, each as (qualified name, text): module,
    class and function docstrings of 120..1500 characters with at least two sentences, and public
    functions of at most 20 lines outside test files."""
    docstrings, functions = [], []
    for doc in docs:
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        module = doc.name.removesuffix(".py").replace("/", ".")
        is_test = "test" in doc.name
        lines = doc.text.splitlines(keepends=True)
        for node in [tree] + _definitions(tree):
            doc_text = ast.get_docstring(node)
            name = module if node is tree else f"{module}.{node.name}"
            if doc_text and 120 <= len(doc_text) <= 1500 and doc_text.count(". ") >= 1:
                docstrings.append((name, doc_text.strip()))
            if (
                isinstance(node, ast.FunctionDef)
                and not is_test
                and not node.name.startswith("_")
                and node.end_lineno - node.lineno <= 20
            ):
                source = "".join(lines[node.lineno - 1 : node.end_lineno])
                if 80 <= len(source) <= 900:
                    functions.append((name, textwrap.dedent(source).rstrip()))
    return docstrings, functions


def _first_sentence(text: str) -> str:
    sentence = re.split(r"(?<=[.!?])\s", " ".join(text.split()), maxsplit=1)[0]
    return sentence if 20 <= len(sentence) <= 200 else ""


def _code_instruction(rng: random.Random, text: str) -> tuple[str, str]:
    template = rng.choice((
        "Explain what this Python function does:\n\n```python\n{text}\n```",
        "Add comments to this Python code:\n\n```python\n{text}\n```",
        "Rewrite this Python function to make it easier to read:\n\n```python\n{text}\n```",
        "Write a unit test for this function:\n\n```python\n{text}\n```",
        "Are there any bugs in this code? Explain.\n\n```python\n{text}\n```",
    ))  # fmt: skip
    return "coding", template.format(text=text)


def _doc_instruction(rng: random.Random, name: str, text: str) -> tuple[str, str]:
    short = name.rsplit(".", 1)[-1]
    choice = rng.randrange(7)
    if choice == 0:
        return "summarization", f"Summarize the following text in a few sentences:\n\n{text}"
    if choice == 1:
        return "summarization", f"Write a one-sentence summary of this documentation:\n\n{text}"
    if choice == 2:
        sentence = _first_sentence(text)
        if sentence:
            return "translation", f"Translate the following sentence into {rng.choice(LANGUAGES)}: {sentence}"
        return "summarization", f"Summarize the following text:\n\n{text}"
    if choice == 3:
        return "rag", f"Use the passage to answer the question.\n\nPassage: {text}\n\nQuestion: What does {short} do?"
    if choice == 4:
        return "extraction", f"List the key terms mentioned in the following text, one per line:\n\n{text}"
    if choice == 5:
        return "qa", f"In Python, what is {name} used for?"
    return "rag", f"Here is some documentation:\n\n{text}\n\nBased on it, when would a programmer use {short}?"


def _math_problem(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 12)
    item = rng.choice(("apples", "books", "pencils", "cookies", "marbles", "tickets", "stickers", "eggs"))
    name = rng.choice(("Maria", "John", "Aisha", "Chen", "Lucas", "Emma", "Ravi", "Sofia", "Omar", "Lena"))
    problems = (
        ("math", f"What is {a} times {b}?"),
        ("math", f"Solve for x: {c}x + {a} = {a + c * b}."),
        ("math", f"What is {a}% of {b * 10}?"),
        ("math", f"Find the area of a rectangle with sides {a} cm and {b} cm."),
        ("math", f"What is the sum of the first {a} positive integers?"),
        ("math_reasoning", f"{name} has {a} {item}. She buys {b} more and gives away {c}. How many {item} does she have now?"),
        ("math_reasoning", f"A box holds {c} {item}. How many boxes are needed for {a * c + rng.randint(1, c - 1)} {item}?"),
        ("math_reasoning", f"{name} reads {c} pages a day. How many days does it take to read a book of {a * c} pages?"),
        ("math_reasoning", f"A shop sells {item} for ${c} each. {name} pays with ${a * c + b}. "
                           f"How much change does {name} get back if {name} buys {a} {item}?"),
        ("math_reasoning", f"A train travels {a * 10} km in {c} hours. What is its average speed?"),
        ("math_reasoning", f"{name} saves ${b} every week. How much has {name} saved after {a} weeks?"),
    )  # fmt: skip
    return rng.choice(problems)


def _template_instruction(rng: random.Random, category: str) -> str:
    topic = rng.choice(TOPICS)
    if category == "writing":
        return rng.choice(WRITING).format(topic=topic)
    if category == "roleplay":
        return rng.choice(ROLEPLAY).format(role=rng.choice(ROLES), topic=topic)
    if category in ("stem", "humanities"):
        pool = SUBJECTS_STEM if category == "stem" else SUBJECTS_HUMANITIES
        subject, other = rng.sample(pool, 2)
        return rng.choice(EXPLAIN).format(subject=subject, other=other)
    if category == "reasoning":
        a, b, c = rng.sample(THINGS, 3)
        start, step = rng.randint(1, 9), rng.randint(2, 7)
        seq = ", ".join(str(start + i * step) for i in range(5))
        return rng.choice(REASONING).format(
            a=a, b=b, c=c, n1=rng.randint(3, 30), n2=rng.randint(1, 9), h=rng.randint(1, 12), s=seq, topic=topic
        )
    if category == "coding":
        return rng.choice(CODING).format(task=rng.choice(CODING_TASKS))
    if category == "translation":
        return f"Translate into {rng.choice(LANGUAGES)}: {rng.choice(SENTENCES)}"
    raise ValueError(f"no template for category {category!r}")


@functools.lru_cache(maxsize=4)
def _split_passages(corpus: str, split: str):
    """The docstring and function passages of a split (reading and parsing the corpus once per process)."""
    train_docs, held_out_docs = split_corpus(read_corpus(corpus))
    return _python_passages(train_docs if split == "train" else held_out_docs)


def chat_instructions(split: str, n: int, seed: int = 0, corpus: str = STDLIB) -> list[dict]:
    """n distinct chat instructions `{"category", "text"}`: about 45% templated over the seed lists,
    30% on docstrings and 10% on function sources of the given split ("train" or "held_out") of the
    corpus, 15% arithmetic word problems. Templated items can repeat across splits; callers that
    need a disjoint held-out set drop the train items from it."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    docstrings, functions = _split_passages(corpus, split)
    if not docstrings or not functions:
        raise ValueError(f"the {split} split of {corpus!r} has no docstring or function passages")
    rng = random.Random(f"{seed}:{split}")
    templated = ("writing", "roleplay", "reasoning", "coding", "stem", "humanities", "translation")
    out, seen = [], set()
    while len(out) < n:
        u = rng.random()
        if u < 0.45:
            category = rng.choice(templated)
            item = (category, _template_instruction(rng, category))
        elif u < 0.75:
            item = _doc_instruction(rng, *rng.choice(docstrings))
        elif u < 0.85:
            item = _code_instruction(rng, rng.choice(functions)[1])
        else:
            item = _math_problem(rng)
        if item[1] not in seen:
            seen.add(item[1])
            out.append({"category": item[0], "text": item[1]})
    return out


__all__ = ["CATEGORIES", "chat_instructions"]
