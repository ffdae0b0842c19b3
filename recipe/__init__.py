"""The recipe end to end: `python -m recipe.demo` (make demo) runs curation, both training stages, generation
and evaluation on the bundled sample."""
