"""Figures and findings of the batch-size experiment (stub)."""


def figures(folder):
    return []


def findings(folder):
    return "stub"
