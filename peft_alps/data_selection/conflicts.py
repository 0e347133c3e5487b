"""PASER's conflict filter: RAKE key phrases of each sample feed a concept graph; a sample is rejected when
two of its concepts are both already in the graph but not connected (they never appeared together in a
selected sample), as in the authors' ``is_consistent`` / ``update_ccg``.

RAKE (Rose et al. 2010), as ``rake_nltk`` does it but with no download: the lowercased text is split into
words (letters/digits, with inner ``'`` or ``-``) and punctuation; a phrase is a maximal run of words without
a stop word (scikit-learn's ``ENGLISH_STOP_WORDS``) or punctuation; a word scores ``degree / frequency``
(degree: summed lengths of the phrases it occurs in), a phrase the sum of its words' scores.
"""

from __future__ import annotations

import re
from itertools import combinations

_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


def stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return ENGLISH_STOP_WORDS


def rake_phrases(text: str, stops: frozenset[str] | None = None) -> list[str]:
    """Distinct RAKE key phrases of ``text``, best first (ties: first appearance)."""
    stops = stop_words() if stops is None else stops
    phrases, current = [], []
    for token in _TOKEN.findall(text.lower()):
        if token[0].isalnum() and token not in stops:
            current.append(token)
        elif current:
            phrases.append(tuple(current))
            current = []
    if current:
        phrases.append(tuple(current))
    freq, degree = {}, {}
    for phrase in phrases:
        for word in phrase:
            freq[word] = freq.get(word, 0) + 1
            degree[word] = degree.get(word, 0) + len(phrase)
    first = {}
    for position, phrase in enumerate(phrases):
        first.setdefault(phrase, position)
    score = {p: sum(degree[w] / freq[w] for w in p) for p in first}
    return [" ".join(p) for p in sorted(first, key=lambda p: (-score[p], first[p]))]


class ConceptGraph:
    """Undirected graph of concepts; nodes enter only with an edge (a one-concept sample adds nothing), as in
    the authors' networkx code."""

    def __init__(self):
        self.edges: dict[str, set[str]] = {}

    def consistent(self, concepts) -> bool:
        """False when two of ``concepts`` are both in the graph and not adjacent."""
        known = sorted(c for c in set(concepts) if c in self.edges)
        return all(b in self.edges[a] for a, b in combinations(known, 2))

    def add(self, concepts) -> None:
        """Connect every pair of ``concepts``."""
        concepts = set(concepts)
        if len(concepts) < 2:
            return
        for c in concepts:
            self.edges.setdefault(c, set()).update(concepts - {c})
