"""The native runner: the C run loop, GIL released for the vCPU's whole life."""

from mpvmm.vcpu_worker import _runloop


def run_native(worker) -> tuple[int, int]:
    return _runloop.run(
        worker.vcpu.fd,
        worker.vcpu.run_address,
        worker.stats_address,
        worker.routes.pack(),
        worker.channel.request_queue.mqd,
        worker.channel.reply_queue.mqd,
        worker.index,
        f"vcpu{worker.index}",
    )
