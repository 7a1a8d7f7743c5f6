"""The forgetting matrix of a continual run and its summary numbers.

``matrix[i][j]`` is the metric (accuracy) on stage j's test split after training stage i (j <= i; the
cells above the diagonal are not measured). Definitions as in Chaudhry et al. 2018 / Lopez-Paz & Ranzato
2017 (GEM): average accuracy = mean of the last row; average forgetting = mean over j < last of
(max over i < last of matrix[i][j]) - matrix[last][j]; backward transfer = mean over j < last of
matrix[last][j] - matrix[j][j]. Own code: a few means; the continual-learning libraries (avalanche) would
bring a framework for three lines.
"""

from __future__ import annotations


def summarize(matrix: list[list[float]]) -> dict:
    """Average accuracy, average forgetting and backward transfer of a lower-triangular matrix (row i has
    i + 1 cells). With one stage, forgetting and backward transfer are None (nothing earlier to forget)."""
    stages = len(matrix)
    for i, row in enumerate(matrix):
        if len(row) < i + 1:
            raise ValueError(f"row {i} of the forgetting matrix has {len(row)} cell(s); it needs {i + 1}")
    last = matrix[-1]
    earlier = range(stages - 1)
    result = {"average_accuracy": sum(last[: stages]) / stages, "average_forgetting": None, "backward_transfer": None}
    if stages > 1:
        result["average_forgetting"] = sum(max(matrix[i][j] for i in range(j, stages - 1)) - last[j]
                                           for j in earlier) / (stages - 1)
        result["backward_transfer"] = sum(last[j] - matrix[j][j] for j in earlier) / (stages - 1)
    return result


def table(names: list[str], matrix: list[list[float]], metric: str = "accuracy") -> str:
    """A markdown table: a row per trained stage, a column per evaluated stage (blank: not yet seen)."""
    header = f"| {metric} after \\ on | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 1)]
    for i, row in enumerate(matrix):
        cells = [f"{row[j]:.4f}" if j < len(row) and j <= i else "" for j in range(len(names))]
        lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
