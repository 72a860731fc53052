"""An opt-in fast path for CUDA (run.py --graph_step): the whole training step as one CUDA graph.

`GraphedStep` wraps train.py's step function from outside and returns a callable with the same
signature and the same results. It is not the default: the default with --compile on CUDA is
torch.compile's own CUDA graphs of the network (mode "reduce-overhead"), the path whose speed has
been measured on a GPU. This one has not run on a GPU yet (docs/gpu.md).

Why it could be faster: one launch per step instead of hundreds, and no host synchronisation.
torch.compile cannot capture the whole step itself: it breaks its graph at draws from a
torch.Generator. Here the noise generator is registered with the graph, so each replay draws what
the eager step would have drawn next and advances the generator as it would.
"""
import torch
from tqdm.auto import tqdm


class GraphedStep:
    """step(idx, lr, ema_weights) -> (loss, grad norm), captured on the first call and replayed after it.

    The step's inputs live in fixed device tensors (the batch's indices, the learning rate Adam reads,
    one weight per EMA) that each call refills. The warm-up steps that capture needs (compilation,
    Adam's state) are undone before capturing: the weights of `modules`, Adam's state and the random
    states are restored, so capturing changes nothing. On a CPU (tests) nothing is captured: the same
    step runs eagerly on the same device tensors; so it does on CUDA, after one warning line, if the
    capture fails (`error` says why). The optimizer must take a tensor learning rate
    (train.make_optimizer with graph_step)."""

    def __init__(self, step, modules, opt, generator, device, n_emas):
        self.step, self.modules, self.opt, self.gen, self.device = step, modules, opt, generator, device
        self.idx = None
        self.lr = torch.zeros((), device=device)
        self.ema_w = [torch.zeros((), device=device) for _ in range(n_emas)]
        for group in opt.param_groups:  # Adam reads this tensor (after a resume, load_state_dict replaced it)
            group["lr"] = self.lr
        self.graph = self.out = self.error = None

    def __call__(self, idx, lr, ema_weights):
        if self.idx is None:
            self.idx = idx.clone()
            if self.device.type == "cuda":
                self._capture_or_fall_back()
        self.idx.copy_(idx)
        self.lr.fill_(lr)
        for w, v in zip(self.ema_w, ema_weights, strict=True):
            w.fill_(v)
        if self.graph is None:
            return self.step(self.idx, self.lr, self.ema_w)
        self.graph.replay()
        return self.out.clone()

    def _capture_or_fall_back(self):
        saved = self._snapshot()
        try:
            self._capture(saved)
        except Exception as e:  # noqa: BLE001 - whatever torch refuses to capture, the eager step still trains
            self.graph, self.error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._restore(saved)
            tqdm.write(f"the training step could not be captured as one CUDA graph ({self.error}); "
                       f"it runs eagerly instead")

    def _capture(self, saved):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compiles the network and creates Adam's state; undone below
                self.step(self.idx, self.lr, self.ema_w)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.gen)  # torch's default generator (dropout) is registered anyway
        self.opt.zero_grad(set_to_none=True)  # the gradients are allocated in the graph's memory
        with torch.cuda.graph(graph):
            self.out = self.step(self.idx, self.lr, self.ema_w)
        self.graph = graph

    def _tensors(self):
        """What the step writes: the weights of every module, and Adam's state (None before its first step)."""
        weights = [v for m in self.modules for v in m.state_dict().values()]
        return weights, [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]

    def _snapshot(self):
        weights, opt = self._tensors()
        return ([t.clone() for t in weights], [v.clone() for v in opt] or None,
                self.gen.get_state(), torch.cuda.get_rng_state(self.device))

    @torch.no_grad()
    def _restore(self, saved):
        weights, opt, noise, default = saved
        live_weights, live_opt = self._tensors()
        for live, old in zip(live_weights, weights, strict=True):
            live.copy_(old)
        for i, v in enumerate(live_opt):  # a new run had no state: Adam's first state is all zeros
            v.zero_() if opt is None else v.copy_(opt[i])
        self.gen.set_state(noise)
        torch.cuda.set_rng_state(default, self.device)
