"""What a Relax rewrite of the CPU pipeline (:mod:`bnfold.targets.tvm.channel_norm`) needs to know about a
function's bindings: each variable's value and how often it is read, so a rewrite that drops an intermediate only
fires when nothing else reads it."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import relax

__all__ = ["Bindings", "index_bindings", "is_op", "rewrite_functions"]


class Bindings:
    """``values``: each bound variable's value; ``uses``: how many times each variable is read (function output
    included)."""

    def __init__(self, values: dict[relax.Var, relax.Expr], uses: dict[relax.Var, int]) -> None:
        self.values, self.uses = values, uses

    def value(self, expr: relax.Expr) -> relax.Expr | None:
        """The value ``expr`` is bound to, when ``expr`` is a variable bound in the function."""
        return self.values.get(expr) if isinstance(expr, relax.Var) else None

    def single_use(self, expr: relax.Expr) -> bool:
        """``expr`` is a dataflow variable read exactly once (an intermediate a rewrite may drop)."""
        return isinstance(expr, relax.DataflowVar) and self.uses.get(expr, 0) == 1


def is_op(expr: relax.Expr | None, name: str) -> bool:
    """``expr`` is a call of the Relax operator ``name`` (``"relax.multiply"``)."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def index_bindings(func: relax.Function) -> Bindings:
    """The :class:`Bindings` of ``func`` (a function whose body is a sequence of binding blocks)."""
    values: dict[relax.Var, relax.Expr] = {}
    uses: dict[relax.Var, int] = {}

    def visit(e: relax.Expr) -> None:
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                values[b.var] = b.value
                relax.analysis.post_order_visit(b.value, visit)
    relax.analysis.post_order_visit(func.body.body, visit)
    return Bindings(values, uses)


def rewrite_functions(mod: tvm.IRModule, mutator: relax.PyExprMutator, on_function: Callable[[Bindings], None],
                      count: Callable[[], int]) -> tvm.IRModule:
    """Run ``mutator`` over every Relax function of ``mod`` (``on_function`` hands it the function's
    :class:`Bindings` first); a function it changed (``count()`` grew) is stored without its now unused bindings."""
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        on_function(index_bindings(func))
        before = count()
        updated = mutator.visit_expr(func)
        if count() != before:
            mutator.builder_.update_func(gv, relax.analysis.remove_all_unused(updated))
    return mutator.builder_.get()
