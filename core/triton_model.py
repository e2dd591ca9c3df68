"""The Triton Python-backend model class shared by `model_repository/*/1/model.py`.

The core never imports Triton: model.py passes in its `triton_python_backend_utils`
module, so this file is plain Python that tests can read and the two model.py files stay
three lines of configuration. It converts Triton requests to strings and back; the
tokenizing, packing, forward and checks are the core's (`serving`, `models`).
"""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import models, serving

# Executes between queuing their forwards and answering: this one on the device, the next one's
# forwards queued behind it; a third waits in execute (device memory holds one batch's work).
IN_FLIGHT = 2


def triton_model_class(pb_utils, kind: str):
    """The `TritonPythonModel` class for model kind `kind` ("esm2" or "dnabert_s")."""
    return type(f"TritonPythonModel[{kind}]", (EmbeddingModel,), {"pb_utils": pb_utils, "kind": kind})


class EmbeddingModel:
    """One Triton model instance: load (plan, warm-up, metrics), then execute -> answering thread."""

    pb_utils = None   # the backend's triton_python_backend_utils (set by triton_model_class)
    kind = ""

    def initialize(self, args):
        pb_utils = self.pb_utils
        problem = serving.numpy_problem()
        if problem:
            raise pb_utils.TritonModelException(problem)
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        try:
            # Pin the device first: nothing may touch CUDA before set_device.
            device, gpu = serving.place_instance(args["model_instance_kind"], args["model_instance_device_id"], config)
            params = serving.config_parameters(config)
            path = serving.checkpoint_path(params, args["model_repository"])
            self.max_request_tokens = serving.max_request_tokens(params)
            self.embedder = models.load_embedder(self.kind, path, serving.runtime_options(params, device))
        except Exception as err:
            raise pb_utils.TritonModelException(f"{type(err).__name__}: {err}") from None
        # Before the warmup: a checkpoint that does not fit the config is refused at once.
        problem = serving.embedding_dims_problem(config, self.output_name, self.embedder.hidden_size)
        if problem:
            raise pb_utils.TritonModelException(problem)
        try:
            # Compile and pick kernels now, not on the first request (counters stay at zero).
            self.embedder.warmup()
        except Exception as err:
            raise pb_utils.TritonModelException(f"warmup failed: {type(err).__name__}: {err}") from None
        e = self.embedder
        pb_utils.Logger.log_info(
            f"{self.model_name} ({args['model_instance_name']}): {path}; plan: {e.plan.describe()}; "
            + (f"{e.fp8_check.describe()}; " if e.fp8_check is not None else "") +
            f"token budget {e.token_budget}, max_length {e.max_length} ({e.config.too_long}), "
            f"max_request_tokens {self.max_request_tokens}")
        self._init_metrics({"model": self.model_name, "gpu": gpu, "instance": args["model_instance_name"]})
        # execute returns once its forwards are queued and this thread answers when the rows
        # are on the host (the response sender, allowed in default mode since Triton 24.06):
        # the device no longer idles while Triton hands over the next batch and it is
        # decoded and tokenized.
        self.answering = ThreadPoolExecutor(1, thread_name_prefix=f"{self.kind}-answer")
        self.in_flight = threading.BoundedSemaphore(IN_FLIGHT)

    def _init_metrics(self, labels: dict) -> None:
        pb_utils = self.pb_utils
        # The families must outlive their metrics (docs/triton.md): keep both on self.
        self.families = {
            name: pb_utils.MetricFamily(name=name, description=text, kind=pb_utils.MetricFamily.COUNTER)
            for name, (_, text) in serving.METRICS.items()
        }
        self.counters = {name: family.Metric(labels=labels) for name, family in self.families.items()}
        check = self.embedder.fp8_check
        if check is not None:   # the plan that runs and what it measured, for clients (summary.json)
            self.families[serving.FP8_GATE_METRIC] = pb_utils.MetricFamily(
                name=serving.FP8_GATE_METRIC, kind=pb_utils.MetricFamily.GAUGE,
                description="fp8 plan: smallest per-sequence cosine of pooled embeddings against fp32 at load")
            self.gate_metric = self.families[serving.FP8_GATE_METRIC].Metric(labels={**labels, "plan": check.plan})
            self.gate_metric.set(check.min_cosine)
        # Wall seconds per phase of execute (embed_prep/compute_seconds_total); the warmup
        # is not in them, it ran before.
        self.phases = serving.PhaseSeconds()
        self.deltas = serving.MetricDeltas()
        self.deltas.take(self.embedder.stats, self.phases)

    def execute(self, requests):
        self.in_flight.acquire()
        try:
            started = time.perf_counter()
            senders = [request.get_response_sender() for request in requests]
            inputs, options = [], []
            for request in requests:
                tensor = self.pb_utils.get_input_tensor_by_name(request, self.input_name)
                sequences = serving.decode_sequences(None if tensor is None else tensor.as_numpy())
                asked = serving.request_options(request.parameters(), self.embedder.num_layers)
                inputs.append(asked if isinstance(asked, Exception) else sequences)
                options.append(serving.RequestOptions() if isinstance(asked, Exception) else asked)
            # Decoding is host work before the encoder, as tokenizing is: both count as prep.
            self.phases.add("prep_seconds", time.perf_counter() - started)
            try:
                launched = serving.launch_requests(self.embedder, inputs, self.phases, self.max_request_tokens,
                                                   [request.is_cancelled for request in requests], options)
            except Exception as err:  # a server fault: every request of this batch learns it
                launched = err
            self.answering.submit(self._answer, launched, senders)
        except BaseException:
            self.in_flight.release()   # not answered here: Triton fails the batch; the slot is free
            raise
        return None

    def _answer(self, launched, senders):
        """Waits for one execute's rows and sends every request its one, final response."""
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            try:
                results = launched.finish() if not isinstance(launched, Exception) else None
            except Exception as err:  # e.g. a device fault surfacing at the wait
                launched = err
                results = None
            if results is None:
                results = [launched] * len(senders)
            for name, value in self.deltas.take(self.embedder.stats, self.phases).items():
                self.counters[name].increment(value)
            for sender, result in zip(senders, results):
                sender.send(self._response(result), flags=final)
        except Exception as err:  # nothing may leave a request unanswered: its client would wait
            self.pb_utils.Logger.log_error(f"{self.model_name}: answering failed: {type(err).__name__}: {err}")
            for sender in senders:
                try:
                    sender.send(self._response(err), flags=final)
                except Exception:  # already answered
                    pass
        finally:
            self.in_flight.release()

    def _response(self, result):
        pb_utils = self.pb_utils
        if isinstance(result, Exception):
            if isinstance(result, serving.RequestCancelled):
                code = getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNAVAILABLE)
            elif serving.is_client_error(result):
                code = pb_utils.TritonError.INVALID_ARG
            else:
                code = pb_utils.TritonError.INTERNAL
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.model_name}: {result}", code))
        tensors = [pb_utils.Tensor(self.output_name, result.mean.astype(self.output_dtype, copy=False))]
        if result.bos is not None:
            tensors.append(pb_utils.Tensor("BOS", result.bos.astype(self.output_dtype, copy=False)))
        if result.tokens is not None:
            padded, counts = serving.pad_token_rows(result.tokens, self.output_dtype)
            tensors += [pb_utils.Tensor("TOKEN_EMBEDDINGS", padded), pb_utils.Tensor("TOKEN_COUNT", counts)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self):
        if hasattr(self, "answering"):
            self.answering.shutdown(wait=True)   # every request answered first
        if hasattr(self, "embedder"):
            self.embedder.close()
