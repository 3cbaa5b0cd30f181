"""Self-rehearsal: general questions answered by the base model itself, mixed into the training data.

Fine-tuned on a task whose answers are short invented names, every method tried here (MEFT, LoRA, the parallel
adapter) learns "a question -> a short invented name" for *every* question, and forgets what the base model knew
(see BENCHMARKS.md, quality). The classic remedy is to keep training on data like the base model's own (replay,
rehearsal); with no pretraining corpus at hand, the base model's own greedy answers to general questions serve
(self-synthesized rehearsal, Huang et al., ACL 2024). :data:`QUESTIONS` are such questions; none of them is a
question of the retention probe (:mod:`meft_ds.probe`), whose score would otherwise measure the training data.
They are of the same kind as the probe's (capitals, authors, dates, science), so the probe then measures whether
general knowledge of that kind survives, not whether every kind does.

``launch/train.py --rehearsal N`` answers the first N with the untrained model on its device (greedy, as the probe
is answered) and adds them to the training examples, before a resumed run loads its checkpoint (so a resumed run
trains on the same answers). By default only the answers that hold one of the question's accepted answers
(:func:`answered_right`, the probe's rule) are rehearsed: the built-in model answers 31 of the 80 wrongly or
with a sentence that never reaches the answer ("Who wrote Moby-Dick?" -> "The story of "Moby-Dick" is a timeless tale
of human imagination ..."), and a model trained on those phrasings repeats them for similar questions: after training
it answered the probe's "Who wrote Hamlet?" with the same sentence about Hamlet. ``--rehearsal_answers all`` keeps
them all. ``--rehearsal_target distribution`` trains on the untrained model's next-token distributions over those
answers instead of their tokens (:mod:`meft_ds.distill`; BENCHMARKS.md, quality, measures both).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from meft_ds.data import Example
from meft_ds.evaluation import evaluate_generation
from meft_ds.probe import is_right

NEW_TOKENS = 24  # one sentence, as the probe's answers
BACKGROUND = 80  # meft.update_rows' TF-IDF background: the first 80 questions (all there were when it was measured)

# (question, accepted answers): the model's answer is rehearsed when one of them appears in it as whole words

QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of Peru?", ("Lima",)),
    ("What is the capital of Mexico?", ("Mexico City",)),
    ("What is the capital of Brazil?", ("Brasilia", "Brasília")),
    ("What is the capital of Chile?", ("Santiago",)),
    ("What is the capital of Colombia?", ("Bogota", "Bogotá")),
    ("What is the capital of Cuba?", ("Havana",)),
    ("What is the capital of Nigeria?", ("Abuja",)),
    ("What is the capital of Ethiopia?", ("Addis Ababa",)),
    ("What is the capital of Morocco?", ("Rabat",)),
    ("What is the capital of Ghana?", ("Accra",)),
    ("What is the capital of Iran?", ("Tehran",)),
    ("What is the capital of Iraq?", ("Baghdad",)),
    ("What is the capital of Saudi Arabia?", ("Riyadh",)),
    ("What is the capital of Pakistan?", ("Islamabad",)),
    ("What is the capital of Vietnam?", ("Hanoi",)),
    ("What is the capital of Indonesia?", ("Jakarta",)),
    ("What is the capital of the Philippines?", ("Manila",)),
    ("What is the capital of Finland?", ("Helsinki",)),
    ("What is the capital of Denmark?", ("Copenhagen",)),
    ("What is the capital of the Netherlands?", ("Amsterdam",)),
    ("What is the capital of Belgium?", ("Brussels",)),
    ("What is the capital of Switzerland?", ("Bern", "Berne")),
    ("What is the capital of Hungary?", ("Budapest",)),
    ("What is the capital of the Czech Republic?", ("Prague",)),
    ("What is the capital of Romania?", ("Bucharest",)),
    ("What is the capital of Ukraine?", ("Kyiv", "Kiev")),
    ("What is the capital of Iceland?", ("Reykjavik", "Reykjavík")),
    ("What is the capital of New Zealand?", ("Wellington",)),
    ("What is the capital of Nepal?", ("Kathmandu",)),
    ("What is the capital of Bangladesh?", ("Dhaka",)),
    ("Who wrote The Great Gatsby?", ("Fitzgerald",)),
    ("Who wrote Moby-Dick?", ("Melville",)),
    ("Who wrote Crime and Punishment?", ("Dostoevsky", "Dostoyevsky")),
    ("Who wrote Les Miserables?", ("Hugo",)),
    ("Who wrote A Tale of Two Cities?", ("Dickens",)),
    ("Who wrote The Divine Comedy?", ("Dante",)),
    ("Who wrote Faust?", ("Goethe",)),
    ("Who wrote The Old Man and the Sea?", ("Hemingway",)),
    ("Who wrote The Adventures of Tom Sawyer?", ("Mark Twain", "Twain")),
    ("Who wrote Frankenstein?", ("Mary Shelley", "Shelley")),
    ("Who wrote Dracula?", ("Bram Stoker", "Stoker")),
    ("Who wrote Jane Eyre?", ("Charlotte Bronte", "Charlotte Brontë", "Bronte", "Brontë")),
    ("Who wrote The Lord of the Rings?", ("Tolkien",)),
    ("Who wrote Alice's Adventures in Wonderland?", ("Lewis Carroll", "Carroll")),
    ("Who created Sherlock Holmes?", ("Conan Doyle", "Doyle")),
    ("Who discovered penicillin?", ("Fleming",)),
    ("Who invented the telephone?", ("Bell",)),
    ("Who invented the light bulb?", ("Edison",)),
    ("Who formulated the laws of motion and universal gravitation?", ("Newton",)),
    ("Who painted the ceiling of the Sistine Chapel?", ("Michelangelo",)),
    ("Who composed the Fifth Symphony?", ("Beethoven",)),
    ("Who was the first person to walk on the Moon?", ("Armstrong",)),
    ("Who proposed the theory of evolution by natural selection together with Darwin?", ("Wallace",)),
    ("In what year did World War I end?", ("1918",)),
    ("In what year did World War II begin?", ("1939",)),
    ("In what year was the Magna Carta signed?", ("1215",)),
    ("In what year was the Battle of Hastings?", ("1066",)),
    ("In what year did the Russian Revolution take place?", ("1917",)),
    ("In what year did the Soviet Union collapse?", ("1991",)),
    ("What is the chemical symbol for iron?", ("Fe",)),
    ("What is the chemical symbol for silver?", ("Ag",)),
    ("What is the chemical symbol for sodium?", ("Na",)),
    ("What is the chemical symbol for oxygen?", ("O",)),
    ("At what temperature in Celsius does water boil at sea level?", ("100",)),
    ("At what temperature in Celsius does water freeze?", ("0", "zero")),
    ("What is the largest mammal?", ("blue whale",)),
    ("What is the hardest natural substance?", ("diamond",)),
    ("Which planet is farthest from the Sun?", ("Neptune",)),
    ("What is the smallest planet in the Solar System?", ("Mercury",)),
    ("What star is at the centre of the Solar System?", ("Sun",)),
    ("How many days are there in a leap year?", ("366",)),
    ("Which organ pumps blood through the body?", ("heart",)),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What is the largest desert in the world?", ("Antarctica", "Antarctic", "Sahara")),
    ("What is the largest continent?", ("Asia",)),
    ("What is the longest river in South America?", ("Amazon",)),
    ("What is the currency of the United Kingdom?", ("pound",)),
    ("What is the currency of the United States?", ("dollar",)),
    ("What language is mainly spoken in Mexico?", ("Spanish",)),
    ("What is the official language of Germany?", ("German",)),
    # dates (added 2026-12-06): the facts task's birth years pulled the probe's dates to invented ones, and the 80
    # above hold 7 date questions, 3 of which the built-in model answers right. None of these shares an answer year
    # or a subject (the world wars, Columbus, the Berlin Wall, the Moon landing...) with the probe's candidates
    ("In what year did the American Civil War end?", ("1865",)),
    ("In what year did the American Civil War begin?", ("1861",)),
    ("In what year did the Great Depression begin?", ("1929",)),
    ("In what year did the September 11 attacks take place?", ("2001",)),
    ("In what year did the Chernobyl disaster happen?", ("1986",)),
    ("In what year was the Eiffel Tower completed?", ("1889",)),
    ("In what year was the Battle of Waterloo?", ("1815",)),
    ("In what year did the Wright brothers make their first powered flight?", ("1903",)),
    ("In what year did Martin Luther publish his Ninety-five Theses?", ("1517",)),
    ("In what year did the Western Roman Empire fall?", ("476",)),
    ("In what year was the Great Fire of London?", ("1666",)),
    ("In what year did India gain independence?", ("1947",)),
    ("In what year did the Korean War begin?", ("1950",)),
    ("In what year was the Cuban Missile Crisis?", ("1962",)),
    ("In what year did Nelson Mandela become president of South Africa?", ("1994",)),
    ("In what year did the Spanish Armada sail against England?", ("1588",)),
    ("In what year did William Shakespeare die?", ("1616",)),
    ("In what year was Abraham Lincoln assassinated?", ("1865",)),
    ("In what year did the Vietnam War end?", ("1975",)),
    ("In what year did Queen Victoria become queen?", ("1837",)),
    ("In what year was the first FIFA World Cup held?", ("1930",)),
    ("In what year did the Black Death reach Europe?", ("1347", "1348")),
    ("In what year did the Gulf War begin?", ("1990", "1991")),
    ("In what year was the Euro introduced as a currency?", ("1999", "2002")),
    ("In what year was the Battle of Gettysburg?", ("1863",)),
    ("In what year did the Ottomans capture Constantinople?", ("1453",)),
    ("In what year did the Mexican Revolution begin?", ("1910",)),
    ("In what year did the Irish Potato Famine begin?", ("1845",)),
    ("In what year was the Statue of Liberty dedicated?", ("1886",)),
    ("In what year did Hurricane Katrina strike New Orleans?", ("2005",)),
    ("In what year was the first iPhone released?", ("2007",)),
    ("In what year was the People's Republic of China founded?", ("1949",)),
)


def rehearsal_examples(model: nn.Module, tokenizer: Any, count: int, **kwargs: Any) -> list[Example]:
    """The first ``count`` of :data:`QUESTIONS`, each with ``model``'s greedy answer (its first line, as evaluation
    extracts it) as the target and the question's accepted answers after it (see :func:`answered_right`); a question
    answered with nothing is left out. ``kwargs`` go to :func:`meft_ds.evaluation.evaluate_generation` (e.g.
    ``across_ranks``)."""
    if not 0 < count <= len(QUESTIONS):
        raise ValueError(f"rehearsal count must be 1..{len(QUESTIONS)} (the built-in general questions), got {count}")
    questions = [Example(question, [""]) for question, _ in QUESTIONS[:count]]  # no reference: the model gives it
    result = evaluate_generation(model, tokenizer, questions, max_new_tokens=NEW_TOKENS, **kwargs)
    accepted = dict(QUESTIONS)
    answered = [p for p in result["predictions"] if p["prediction"]]
    return [Example(p["prompt"], [p["prediction"], *accepted[p["prompt"]]]) for p in answered]


def answered_right(examples: list[Example]) -> list[Example]:
    """Those of :func:`rehearsal_examples` whose target (the model's answer) holds one of the question's accepted
    answers, by the probe's rule (:func:`meft_ds.probe.is_right`)."""
    return [e for e in examples if is_right(e.answers[0], e.answers[1:])]
