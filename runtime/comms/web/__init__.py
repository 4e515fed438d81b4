"""The live view: a small web page served by the runtime (aiohttp, on its own thread and event loop).

Per camera it shows the last scored frame with the anomaly map and defect box, the last
verdicts, a score chart with the threshold, counters and states; below, the evidence
gallery. Frames are rendered here, at most `live_fps` a second and only while someone
watches, so the inspection loop only stores a reference to its last frame.
Anything that changes the line (threshold, marking a reject as a good part) needs the
operator token in an `Authorization: Bearer` header and leaves an AUDIT log line; the
token itself is never logged. `/api/status` and `/api/verdicts` are what the page and
`coft status` read.

Viewers can never take what inspection needs: at most `max_connections` are open at once
(more are closed as they arrive, so they hold no file descriptor), at most `max_viewers`
watch the live stream, and a connection that sends nothing, or a viewer that reads
nothing, for `idle_timeout_s` is closed. The event loop's own errors are throttled.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path

import cv2
from aiohttp import web

from coft.runtime.comms.loops import LoopService
from coft.runtime.comms.service import Service
from coft.runtime.comms.view import LineControls, LineView
from coft.runtime.config import WebConfig
from coft.runtime.line.evidence import ANNOTATED, LABELS, feedback_folder
from coft.runtime.model.errors import CoftError
from coft.runtime.model.heatmap import annotate
from coft.runtime.process.logs import Throttled

log = logging.getLogger(__name__)
__all__ = ["WebServer"]
audit = logging.getLogger("coft.audit")
STATIC = Path(__file__).parent / "static"
EVIDENCE_FILE = re.compile(r"^[A-Za-z0-9_-]+-\d{9}-(accept|reject)(\.jpg|\.json|-annotated\.jpg)$")
STEM = re.compile(r"^[A-Za-z0-9_-]+-\d{9}-reject$")
COMMISSIONING_FILE = re.compile(r"^\d{6}-[A-Za-z0-9_-]+-\d+\.jpg$")  # as line/commissioning.py names its frames
LIVE_WIDTH = 640  # live frames are scaled down to this: the page needs no more, the box's CPU is the line's


class WebServer(LoopService, Service):
    def __init__(self, view: LineView, controls: LineControls, config: WebConfig):
        """`view`: what the page shows (comms/view.py); `controls`: what an operator with the token may change."""
        super().__init__("web")
        self.view, self.controls, self.config = view, controls, config
        self.token = config.token()
        self.rendered: dict[str, tuple[dict, bytes]] = {}  # camera -> (verdict shown, its JPEG), shared by viewers
        self.throttled = Throttled(log)
        self.viewers = 0  # live streams being served
        self.listener: asyncio.AbstractServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def allowed_host(self, host: str) -> bool:
        """The Host a request names: an IP address, localhost, this box's own names or web.allowed_hosts. A browser
        sends the name it resolved, so a foreign page rebinding its own name to this box is turned away."""
        name = host[1:host.find("]")] if host.startswith("[") else host.split(":")[0]  # [::1]:8080, name:8080
        name = name.lower().removesuffix(".")
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
        own = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
        return name in own | {h.lower() for h in self.config.allowed_hosts}

    @web.middleware
    async def host_check(self, request: web.Request, handler):
        if not self.allowed_host(request.host):
            self.throttled.log(logging.WARNING, "host", "web: a request from %s named host %r, not this box: "
                               "refused (DNS rebinding?); add it to web.allowed_hosts if it is yours",
                               request.remote, request.host)
            raise _error(web.HTTPMisdirectedRequest, f"this box does not answer to {request.host!r}; add it to "
                                                     "web.allowed_hosts in line.yaml if it is a name of yours")
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024, middlewares=[self.host_check])
        app.add_routes([
            web.get("/", self.index), web.static("/static", STATIC),
            web.get("/api/status", self.status), web.get("/api/verdicts", self.verdicts),
            web.get("/api/cameras/{camera}/live.mjpg", self.live_stream),
            web.get("/api/cameras/{camera}/live.jpg", self.live_frame),
            web.post("/api/cameras/{camera}/threshold", self.set_threshold),
            web.post("/api/outbox/acknowledge", self.acknowledge_new_epoch),
            web.get("/api/evidence", self.evidence_list),
            web.get("/api/evidence/{camera}/{name}", self.evidence_file),
            web.post("/api/evidence/{camera}/{stem}/{label:good|defect}", self.mark),
            web.get("/api/commissioning/review", self.review),
            web.get("/api/commissioning/frames/{file}", self.review_frame),
            web.post("/api/commissioning/frames/{file}/{label:good|defect}", self.review_sort),
        ])
        return app

    async def setup(self) -> web.AppRunner:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=2,
                               keepalive_timeout=self.config.idle_timeout_s)
        await runner.setup()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self.loop_error)
        server = runner.server

        def connection() -> asyncio.Protocol:
            if len(server.connections) < self.config.max_connections:
                return server()
            self.throttled.log(logging.WARNING, "connections", "web: %d connections are open (web.max_connections); "
                               "closing new ones as they arrive", len(server.connections))
            return _Closed()

        self.listener = await loop.create_server(connection, self.config.bind, self.config.port, reuse_address=True)
        return runner

    async def teardown(self, runner: web.AppRunner) -> None:
        self.listener.close()
        await runner.cleanup()

    def loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """asyncio's own complaints (an accept() out of file descriptors, once a second), one line a minute."""
        error = context.get("exception")
        self.throttled.log(logging.ERROR, "loop", "web: %s%s", context.get("message", "event loop error"),
                           f": {type(error).__name__}: {error}" if error else "")

    def start(self) -> None:
        """Listen, or raise a one-line CoftError (port taken, address not this box's) before inspection starts."""
        try:
            self.launch()
        except OSError as exc:
            raise CoftError(f"web.port {self.config.port} on {self.config.bind}: cannot listen "
                            f"({exc.strerror or exc}); another process uses it, or the address is not "
                            "this box's: change web.port or web.bind") from None
        log.info("live view on http://%s:%d/ (operator actions %s)", self.config.bind, self.config.port,
                 "need the token" if self.token else "off: no web.token_file or web.token_env")

    def health(self, stall_s: float) -> str | None:  # noqa: ARG002
        return None if self.alive() else "the live view's web server stopped"

    def status_fields(self) -> dict:
        return {"web_actions": bool(self.token)}

    # -- reading -----------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self.view.status))

    def camera(self, request: web.Request) -> str:
        camera = request.match_info.get("camera") or request.query.get("camera")
        if camera is not None and camera not in self.view.cameras:
            raise _error(web.HTTPNotFound, f"no camera named {camera!r}; cameras: {', '.join(self.view.cameras)}")
        return camera

    async def verdicts(self, request: web.Request) -> web.Response:
        """The recent verdicts of one camera (or all), oldest first; `after=SEQ` gives only newer ones."""
        camera, after, limit = self.camera(request), _number(request, "after", -1), _number(request, "limit", 50)
        chosen = [camera] if camera else list(self.view.recent)
        found = [v for name in chosen for v in tuple(self.view.recent[name]) if v.seq is not None and v.seq > after]
        found.sort(key=lambda v: v.capture_ts)
        return web.json_response({"verdicts": [v.as_dict() for v in found[-min(max(limit, 1), 300):]]})

    async def live_jpeg(self, camera: str) -> bytes | None:
        view = self.view.views.get(camera)
        if view is None:
            return None
        frame, score_map, verdict = view
        cached = self.rendered.get(camera)
        if cached and cached[0] is verdict:
            return cached[1]
        picture = await asyncio.to_thread(annotate, frame.image, verdict, score_map, self.view.origin(camera),
                                          LIVE_WIDTH)
        ok, jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            return None
        self.rendered[camera] = (verdict, jpeg.tobytes())
        return self.rendered[camera][1]

    async def live_frame(self, request: web.Request) -> web.Response:
        jpeg = await self.live_jpeg(self.camera(request))
        if jpeg is None:
            raise _error(web.HTTPServiceUnavailable, "no frame has been scored yet on this camera")
        return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def live_stream(self, request: web.Request) -> web.StreamResponse:
        """MJPEG: a new picture whenever a new verdict is in, at most live_fps a second."""
        camera = self.camera(request)
        if self.viewers >= self.config.max_viewers:
            raise _error(web.HTTPServiceUnavailable, f"{self.viewers} viewers are watching already (web.max_viewers); "
                         "close another page or raise web.max_viewers")
        response = web.StreamResponse(headers={"Content-Type": "multipart/x-mixed-replace; boundary=frame",
                                               "Cache-Control": "no-store"})
        self.viewers += 1
        shown, first = None, True
        try:
            await response.prepare(request)
            await response.write(b"--frame\r\n")
            while not self.stopping.is_set():
                view = self.view.views.get(camera)
                if view is not None and view[2] is not shown:
                    shown = view[2]
                    jpeg = await self.live_jpeg(camera)
                    if jpeg:  # a browser shows a part once the next one has begun: a new viewer gets the frame
                        # twice, so the last frame of a camera that went quiet shows at once (a viewer that reads
                        # nothing for idle_timeout_s is let go)
                        part = b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n--frame\r\n" % (len(jpeg), jpeg)
                        await asyncio.wait_for(response.write(part * (2 if first else 1)), self.config.idle_timeout_s)
                        first = False
                await asyncio.sleep(1 / self.config.live_fps)
        except (ConnectionError, RuntimeError, asyncio.TimeoutError):  # the viewer went away, or stopped reading
            request.transport and request.transport.abort()
        finally:
            self.viewers -= 1
        return response

    def gallery(self):
        evidence = self.view.evidence
        if evidence is None:
            raise _error(web.HTTPNotFound, "evidence is off: add an evidence: block to line.yaml to keep rejected frames")
        return evidence

    async def evidence_list(self, request: web.Request) -> web.Response:
        """Rejected frames, newest first, each with its verdict and what an operator marked it ('good', 'defect')."""
        camera, evidence = self.camera(request), self.gallery()
        items = []
        for path in await asyncio.to_thread(evidence.rejects, camera, min(_number(request, "limit", 24), 200)):
            try:
                verdict = json.loads(path.read_text())
            except (OSError, ValueError):  # deleted for the budget, or half-written: not worth a tile
                continue
            stem, folder = path.stem, path.parent.name
            items.append({"camera": folder, "stem": stem, "verdict": verdict,
                          "raw": f"/api/evidence/{folder}/{stem}.jpg",
                          "annotated": f"/api/evidence/{folder}/{stem}{ANNOTATED}"
                          if path.with_name(stem + ANNOTATED).is_file() else None,
                          "marked": next((label for label in LABELS
                                          if (self.feedback_folder(label) / f"{stem}.json").is_file()), None)})
        return web.json_response({"evidence": items})

    async def evidence_file(self, request: web.Request) -> web.FileResponse:
        camera, name = self.camera(request), request.match_info["name"]
        path = self.gallery().config.dir / camera / name
        if not EVIDENCE_FILE.match(name) or not path.is_file():
            raise _error(web.HTTPNotFound, f"no evidence file {name} for camera {camera} (deleted for the disk budget?)")
        return web.FileResponse(path)

    # -- the commissioning review ------------------------------------------------------------
    async def current_review(self):
        try:
            return await asyncio.to_thread(self.view.review)
        except CoftError as exc:
            raise _error(web.HTTPNotFound, str(exc)) from None

    async def review(self, request: web.Request) -> web.Response:
        """The frames the commissioned threshold rejects, worst first, and the promise as sorted so far."""
        review = await self.current_review()
        return web.json_response(await asyncio.to_thread(review.state))

    def frame_name(self, request: web.Request) -> str:
        name = request.match_info["file"]
        if not COMMISSIONING_FILE.match(name):
            raise _error(web.HTTPNotFound, f"{name} is not the name of a commissioning frame")
        return name

    async def review_frame(self, request: web.Request) -> web.FileResponse:
        name, review = self.frame_name(request), await self.current_review()
        try:
            return web.FileResponse(await asyncio.to_thread(review.image, name))
        except CoftError as exc:
            raise _error(web.HTTPNotFound, str(exc)) from None

    async def review_sort(self, request: web.Request) -> web.Response:
        """An operator's word on a frame the commissioned threshold rejects; the promise moves with it."""
        name, label = self.frame_name(request), request.match_info["label"]
        who = self.authorise(request, f"sorting commissioning frame {name} as {label}")
        review = await self.current_review()
        try:
            unsorted = await asyncio.to_thread(review.label, name) is None
            target = await asyncio.to_thread(review.sort, name, label)
        except CoftError as exc:
            raise _error(web.HTTPNotFound, str(exc)) from None
        except OSError as exc:
            log.error("web: cannot sort %s as %s (%s); check the folder %s", name, label, exc, review.folder)
            raise _error(web.HTTPInternalServerError, f"cannot write to {review.folder}: {exc}") from None
        state = await asyncio.to_thread(review.state)
        audit.info("AUDIT commissioning-review frame=%s operator=%s to=%s via=%s promise=%r", name, label, target, who,
                   state["promise"])
        if unsorted and not state["left"]:  # this click sorted the last frame: the bank can learn their word
            state["learning"] = await asyncio.to_thread(self.controls.learn_from_review, who)
        return web.json_response(state)

    # -- operator actions --------------------------------------------------------------------
    def authorise(self, request: web.Request, action: str) -> str:
        """Who is acting (for the AUDIT line), or an HTTP error; the token is compared in constant time."""
        if not self.token:
            raise _error(web.HTTPForbidden, "operator actions are off: set web.token_file or web.token_env in line.yaml")
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            self.throttled.log(logging.WARNING, "token", "web: %s from %s refused: operator token missing or wrong",
                               action, request.remote)
            raise _error(web.HTTPUnauthorized, "operator token missing or wrong")
        return f"web:{request.remote}"

    async def read_json(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise _error(web.HTTPBadRequest, 'send a JSON object, e.g. {"threshold": 0.42}')
        return body

    async def set_threshold(self, request: web.Request) -> web.Response:
        camera = self.camera(request)
        who = self.authorise(request, f"threshold change for camera {camera}")
        value = (await self.read_json(request)).get("threshold")
        if not self.view.config.control.threshold:
            raise _error(web.HTTPForbidden, "threshold changes are off (control.threshold: false in line.yaml)")
        try:
            state = await asyncio.to_thread(self.controls.set_threshold, camera, str(value), who)
        except CoftError as exc:
            log.warning("web: threshold for camera %s refused: %s", camera, exc)
            raise _error(web.HTTPBadRequest, str(exc)) from None
        return web.json_response(state)

    async def acknowledge_new_epoch(self, request: web.Request) -> web.Response:
        who = self.authorise(request, "acknowledging the outbox's new epoch")
        return web.json_response(await asyncio.to_thread(self.controls.acknowledge_new_epoch, who))

    def feedback_folder(self, label: str) -> Path:
        """Where this line keeps frames an operator marked (line/evidence.py: the page has evidence, so one exists)."""
        harvest = self.view.harvest.config.dir if self.view.harvest else None
        folder = feedback_folder(label, harvest, self.view.evidence.config.dir)
        assert folder is not None
        return folder

    async def mark(self, request: web.Request) -> web.Response:
        """An operator's word on a rejected frame: a good part (a false reject) or a real defect."""
        camera, stem, label = self.camera(request), request.match_info["stem"], request.match_info["label"]
        who = self.authorise(request, f"marking {stem} {label}")
        evidence = self.gallery()
        if not STEM.match(stem) or not (evidence.config.dir / camera / f"{stem}.json").is_file():
            raise _error(web.HTTPNotFound, f"no rejected frame {stem} for camera {camera} (deleted for the disk budget?)")
        try:
            target = await asyncio.to_thread(self._file_as, label, camera, stem, who)
        except OSError as exc:
            log.error("web: cannot keep %s as %s (%s); check the folder %s", stem, label, exc, self.feedback_folder(label))
            raise _error(web.HTTPInternalServerError, f"cannot write to {self.feedback_folder(label)}: {exc}") from None
        audit.info("AUDIT feedback camera=%s frame=%s verdict=reject operator=%s to=%s via=%s", camera, stem, label,
                   target, who)
        return web.json_response({"stem": stem, "marked": label, "saved_to": str(target)})

    def _file_as(self, label: str, camera: str, stem: str, who: str) -> Path:
        """The raw frame and its verdict, with the operator's word, in the label's folder. A frame the harvest kept
        too is moved, so that learning sees it once, with its label; a frame marked before is moved to the new one."""
        folder = self.feedback_folder(label)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        source = self.view.evidence.config.dir / camera
        verdict = json.loads((source / f"{stem}.json").read_text())
        verdict["operator"] = {"verdict": label, "by": who,
                               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        elsewhere = [self.view.harvest.config.dir / camera] if self.view.harvest else []
        elsewhere += [self.feedback_folder(other) for other in LABELS if other != label]
        moved = next((place for place in elsewhere if (place / f"{stem}.jpg").is_file()), None)
        if moved:
            shutil.move(moved / f"{stem}.jpg", folder / f"{stem}.jpg")
            (moved / f"{stem}.json").unlink(missing_ok=True)
        else:
            shutil.copyfile(source / f"{stem}.jpg", folder / f"{stem}.jpg")
        with open(os.open(folder / f"{stem}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(verdict, f)
        return folder / f"{stem}.jpg"


class _Closed(asyncio.Protocol):
    """A connection over web.max_connections: closed as soon as it is accepted, so it holds no descriptor."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


def _number(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise _error(web.HTTPBadRequest, f"{name} must be a whole number") from None


def _error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    """An HTTP error whose body says, in one line of JSON, what is wrong and how to fix it."""
    return kind(text=json.dumps({"error": message}), content_type="application/json")
