"""The evaluation stage: win rates of models against a baseline, judged by a reward model.

- :mod:`~dppo.eval.judges`: judges behind one interface, their registry and the score cache;
- :mod:`~dppo.eval.winrate`: ``evaluate()`` (generate, judge, compare) and the win-rate arithmetic;
- :mod:`~dppo.eval.plots`: the figures of an evaluation.
"""

from dppo._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "evaluate": "winrate", "EvalConfig": "winrate", "Comparison": "winrate", "compare": "winrate",
    "results_markdown": "winrate",
    "Judge": "judges", "Score": "judges", "JudgeOptions": "judges", "ScoreCache": "judges", "JUDGES": "judges",
    "make_judge": "judges", "register_judge": "judges", "register_judge_factory": "judges", "score_items": "judges",
    "plot_win_rates": "plots", "plot_reward_differences": "plots",
})
