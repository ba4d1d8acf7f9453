"""spattenc passes (installed as ``spatten_compiler.passes``). One pass per module; importing this
package registers them all in :data:`spatten_compiler.pipeline.PASSES`."""

from __future__ import annotations
