"""The pipelines as data: which stages each of the eight pipelines runs after the teacher, and the settings
it fixes (`Pipeline`, `PIPELINE_CONFIGS`). Standard library only, so research_settings can import it and
`--help` still prints without loading torch; the run, the ablation, the printer and the model card read it.
"""

from dataclasses import dataclass, field
from typing import Dict, Tuple


# ---------------------------------------------------------------------------------------------
# Pipelines as data
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pipeline:
    """The stages a pipeline runs after the teacher, in order (always teacher -> kd -> prune -> quant), and
    the settings it fixes whatever the command line says (e.g. a method)."""
    stages: Tuple[str, ...]
    description: str
    overrides: Dict = field(default_factory=dict)

    @property
    def chain(self) -> Tuple[str, ...]:
        return ('teacher',) + self.stages


# The eight pipelines as data; the run, the ablation, the printer and the model card all read this table.
PIPELINE_CONFIGS: Dict[str, Pipeline] = {
    'baseline': Pipeline((), 'Evaluate the teacher only (no compression)'),
    'kd_only': Pipeline(('kd',), 'KD only: teacher -> student'),
    'prune_only': Pipeline(('prune',), 'Prune the teacher (then fine-tune)'),
    'quant_only': Pipeline(('quant',), 'Quantize the teacher'),
    'kd_prune': Pipeline(('kd', 'prune'), 'KD, then prune the student'),
    'kd_quant': Pipeline(('kd', 'quant'), 'KD, then quantize the student'),
    'prune_quant': Pipeline(('prune', 'quant'), 'Prune the teacher, then quantize it'),
    'kd_prune_quant': Pipeline(('kd', 'prune', 'quant'), 'Full pipeline: KD -> prune student -> quantize'),
}
