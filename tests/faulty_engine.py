"""An engine process whose decode step raises for requests marked {"fault": "step"} (a stand-in
for an engine bug that no per-request check catches) and declares itself unusable for
{"fault": "unusable"}. Everything else is the real thing: NativeEngine on the tiny model, the
real EngineService and WaveWorker, a real Redis.

    python faulty_engine.py MODEL_DIR REDIS_URL MAX_DELIVERIES
"""

from __future__ import annotations

import logging
import sys

import anyio

from efficientrollout.engines import EngineUnusable
from efficientrollout.engines.native import EngineConfig, NativeEngine
from efficientrollout.pipeline.service import EngineService, WorkerConfig
from efficientrollout.speculation import SpeculationConfig


class FaultyEngine(NativeEngine):
    def _decode_step(self, running, wave_filled):
        faults = {s.request.metadata.get("fault") for s in running}
        if "unusable" in faults:
            raise EngineUnusable("injected: the device is gone")
        if "step" in faults:
            raise RuntimeError("injected engine bug")
        return super()._decode_step(running, wave_filled)


def main(model: str, redis_url: str, max_deliveries: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    engine = FaultyEngine(EngineConfig(model=model, dtype="float32", max_batch_size=8, max_seq_len=256,
                                       speculation=SpeculationConfig(mode="plain")), engine_id="faulty")
    anyio.run(EngineService(engine, WorkerConfig(redis_url=redis_url, max_deliveries=max_deliveries, wave_size=16)).run)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
