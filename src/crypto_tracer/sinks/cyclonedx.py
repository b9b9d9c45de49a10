"""``snapshot -f cyclonedx``: the snapshot inventory (and observed TLS handshakes) as a CycloneDX 1.6
CBOM, modelled with cyclonedx-python-lib and validated against the 1.6 JSON schema before it is written.

What becomes what:
- a crypto library (name, version) -> a ``library`` component; its paths are evidence occurrences,
  the processes that map it properties; statically linked TLS (Go, a static OpenSSL) likewise;
- a certificate (each one of a bundle) -> a ``certificate`` asset (subject, issuer, validity,
  format, extension) with its signature algorithm and its subject public key (a
  ``related-crypto-material`` public key);
- a key file -> a ``related-crypto-material`` asset (type, size, algorithm; never key material);
- every algorithm named by those -> an ``algorithm`` asset (host/algorithms.py);
- observed handshakes -> one ``protocol`` asset per TLS version with the suites in use (IANA names
  and code points), the key-exchange groups in ``cryptoRefArray``; the library that did the
  handshake ``provides`` the protocol and those algorithms.

Two things cyclonedx-python-lib cannot express are written into its JSON afterwards (and the result
is what is validated): ``dependencies[].provides`` (lib issue #691), and cipher-suite
``identifiers`` in the registry's byte order (the lib keeps them as a sorted set, which would turn
["0xC0", "0x30"] into ["0x30", "0xC0"]). Evidence occurrences are sorted there too (the lib's
Occurrence has no order of its own).

bom-refs are derived from the content (names, OIDs, certificate identity, public key hashes,
paths), so the same host state gives the same refs; the serial number is derived from host name
and time.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime

from crypto_tracer.errors import ExitStatus, TracerError
from crypto_tracer.host import algorithms as algs
from crypto_tracer.host.algorithms import Algorithm

PROPERTY_PREFIX = "crypto-tracer:"
INSTALL_HINT = "pip install 'cyclonedx-python-lib[json-validation]>=11,<12' (./setup install does)"
# a handshake's library (tls_handshake events) -> the snapshot's library names of that family, TLS one first
_TLS_LIBRARIES = {"openssl": ("libssl", "libcrypto"), "boringssl": ("libssl", "libcrypto"),
                  "gnutls": ("libgnutls",), "nss": ("libssl3", "libnss3")}


def check_available() -> None:
    try:
        import cyclonedx  # noqa: F401
        from cyclonedx.validation.json import JsonStrictValidator  # noqa: F401
        import jsonschema  # noqa: F401  (the [json-validation] extra)
    except ImportError as exc:
        raise TracerError(f"-f cyclonedx needs cyclonedx-python-lib with its json-validation extra ({exc.name} "
                          "is missing)", ExitStatus.ERROR, INSTALL_HINT) from None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+_-]+", "-", text.lower()).strip("-") or "unnamed"


def _digest(*parts) -> str:
    return hashlib.sha256("\x00".join("" if p is None else str(p) for p in parts).encode()).hexdigest()[:16]


def _date(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _process_fact(p: dict) -> str:
    """A process as one property value (JSON, so paths with spaces stay unambiguous)."""
    fact = {"pid": p.get("pid"), "ppid": p.get("ppid"), "name": p.get("name") or p.get("process"),
            "exe": p.get("exe"), "uid": p.get("uid"), "user": p.get("running_as")}
    if p.get("root") not in (None, "/"):
        fact["root"] = p["root"]
    container = p.get("container")
    if container:
        fact["container"] = container.get("id") or container.get("mount_ns")
    return json.dumps(fact, separators=(",", ":"))


def _user(uid: int | None) -> str | None:
    from crypto_tracer.host.inventory import user_name

    return user_name(uid)


class _Cbom:
    """The components, their evidence and their relations, gathered before the Bom is made."""

    def __init__(self):
        self.components: dict[str, dict] = {}  # ref -> {kind, args, occurrences{loc: set(context)}, props}
        self.depends: dict[str, set[str]] = {}
        self.provides: dict[str, set[str]] = {}
        self.suite_ids: dict[str, list[str]] = {}  # suite name -> identifiers in registry order
        self.spki: dict[str, set[str]] = {}  # SHA-256 of a public key -> the key assets of it

    def add(self, ref: str, kind: str, **args) -> dict:
        entry = self.components.get(ref)
        if entry is None:
            entry = self.components[ref] = {"kind": kind, "args": args, "occurrences": {}, "props": set()}
        return entry

    def occurrence(self, ref: str, location: str | None, context: str | None = None) -> None:
        if location:
            self.components[ref]["occurrences"].setdefault(location, set()).add(context or "")

    def prop(self, ref: str, name: str, value) -> None:
        if value is not None:
            self.components[ref]["props"].add((PROPERTY_PREFIX + name, str(value)))

    def algorithm(self, alg: Algorithm | None) -> str | None:
        if alg is None:
            return None
        ref = f"crypto/algorithm/{_slug(alg.name)}" + (f"@{alg.oid}" if alg.oid else "")
        self.add(ref, "algorithm", alg=alg)
        return ref


# --- the inventory -------------------------------------------------------------------------

def _libraries(cb: _Cbom, doc: dict) -> dict[int, list[tuple[str, str]]]:
    """Library components; returns pid -> [(family or name, ref)] for handshake attribution."""
    by_pid: dict[int, list[tuple[str, str]]] = {}
    for p in doc["processes"]:
        fact = _process_fact(p)
        for lib in p["libraries"]:
            ref = f"crypto/library/{_slug(lib['name'])}" + (f"@{lib['version']}" if lib["version"] else "")
            cb.add(ref, "library", name=lib["name"], version=lib["version"])
            cb.occurrence(ref, lib["path"], f"mapped by pid {p['pid']} ({p['name']})")
            cb.prop(ref, "process", fact)
            by_pid.setdefault(p["pid"], []).append((lib["name"], ref))
        static = p.get("static_tls")
        if static:
            name = f"{static['library']} (static)"
            ref = f"crypto/library/{_slug(name)}" + (f"@{static['version']}" if static.get("version") else "")
            cb.add(ref, "library", name=name, version=static.get("version"))
            # the file that carries it: the executable, or a module it loaded (curl_cffi's BoringSSL)
            cb.occurrence(ref, static.get("path") or p["exe"], f"linked into pid {p['pid']} ({p['name']})")
            cb.prop(ref, "process", fact)
            by_pid.setdefault(p["pid"], []).append((f"static:{static['library']}", ref))
    return by_pid


def _key_material(cb: _Cbom, kind: str, info: dict, identity: str, spki: str | None = None) -> str:
    """A public or private key (related-crypto-material): type, size, algorithm; no material. Keys
    whose public key is known (spki: SHA-256 of its SubjectPublicKeyInfo) are one asset wherever
    they are found: a certificate's key and a public key file of it, two copies of a key file."""
    alg = algs.key_algorithm(info.get("algorithm"), info.get("key_size"), info.get("curve"))
    alg_ref = cb.algorithm(alg)
    name = alg.name if alg else "unknown key"
    ref = f"crypto/key/{kind}-{_slug(name)}@{spki[:16] if spki else identity}"
    cb.add(ref, "key", name=name, type=kind, size=info.get("key_size"), algorithm_ref=alg_ref)
    if alg_ref:
        cb.depends.setdefault(ref, set()).add(alg_ref)
    if spki:
        cb.prop(ref, "public_key_sha256", spki)
        cb.spki.setdefault(spki, set()).add(ref)
    return ref


def _certificate(cb: _Cbom, info: dict, path: str) -> str:
    if "subject" not in info:  # not parsed: what it is and where, nothing guessed
        ref = f"crypto/certificate/{_slug(path.rsplit('/', 1)[-1])}@{_digest(path)}"
        cb.add(ref, "certificate", name=path.rsplit("/", 1)[-1], info=None, path=path)
        cb.prop(ref, "error", info.get("error") or "not parsed")
        return ref
    identity = _digest(info["subject"], info["issuer"], info.get("serial"))
    cn = re.search(r"(?:^|,)CN=((?:[^,\\]|\\.)+)", info["subject"])
    name = cn.group(1) if cn else info["subject"] or "certificate"
    ref = f"crypto/certificate/{_slug(name)}@{identity}"
    if ref not in cb.components:
        sig_ref = cb.algorithm(algs.signature_algorithm(info.get("signature_algorithm")))
        key_ref = _key_material(cb, "public-key", {"algorithm": info.get("key_algorithm"),
                                                   "key_size": info.get("key_size"), "curve": info.get("curve")},
                                identity, info.get("public_key_sha256"))
        cb.add(ref, "certificate", name=name, info=info, path=path, signature_ref=sig_ref, key_ref=key_ref)
        cb.depends.setdefault(ref, set()).update(r for r in (sig_ref, key_ref) if r)
        cb.prop(ref, "serial", info.get("serial"))
        cb.prop(ref, "self_signed", str(info.get("self_signed")).lower() if info.get("self_signed") is not None
                else None)
        for flag in info.get("flags", ()):
            cb.prop(ref, "flag", flag)
    return ref


def _files(cb: _Cbom, doc: dict) -> None:
    for p in doc["processes"]:
        fact = _process_fact(p)
        for f in p["open_crypto_files"]:
            context = f"open in pid {p['pid']} ({p['name']})"
            if f["type"] == "certificate" and f.get("certificates"):  # every certificate of the file
                for info in f["certificates"]:
                    ref = _certificate(cb, info, f["path"])
                    cb.occurrence(ref, f["path"], context)
                    cb.prop(ref, "process", fact)
                continue
            if f["type"] == "certificate":
                ref = _certificate(cb, f.get("certificate") or {}, f["path"])
                bundle = (f.get("certificate") or {}).get("bundle")
                if bundle:  # a document made without bundles: the first in full, the others counted
                    cb.prop(ref, "bundle_certificates", bundle["certificates"])
            elif f["type"] in ("private_key", "public_key"):
                info = f.get("key") or {}  # {}: not parsed (unreadable, unknown form): type and place only
                kind = "private-key" if f["type"] == "private_key" else "public-key"
                ref = _key_material(cb, kind, info, _digest(f["path"]), f.get("public_key_sha256"))
                cb.prop(ref, "encrypted", str(info["encrypted"]).lower() if "encrypted" in info else None)
                for flag in info.get("flags", ()):
                    cb.prop(ref, "flag", flag)
                cb.prop(ref, "error", info.get("error"))
            else:  # keystores, CSRs, CRLs: the file is crypto material in use, its content not modelled
                ref = f"crypto/material/{_slug(f['type'])}@{_digest(f['path'])}"
                cb.add(ref, "key", name=f"{f['type']} {f['path'].rsplit('/', 1)[-1]}", type="other", size=None,
                       algorithm_ref=None)
                cb.prop(ref, "file_type", f["type"])
            cb.occurrence(ref, f["path"], context)
            cb.prop(ref, "process", fact)
    # a private key depends on its public key where that is an asset too (the key of a certificate)
    for refs in cb.spki.values():
        private = {r for r in refs if r.startswith("crypto/key/private-key-")}
        for r in private:
            cb.depends.setdefault(r, set()).update(refs - private)


# --- observed handshakes -------------------------------------------------------------------

def _handshakes(cb: _Cbom, events: list[dict], libs_by_pid: dict[int, list[tuple[str, str]]]) -> None:
    protocols: dict[str, dict] = {}  # version -> {suites: {name: suite}, groups: set, count}
    for ev in events:
        if ev.get("event_type") != "tls_handshake" or ev.get("result") not in (None, "success"):
            continue
        ref, ptype, version, name = _protocol(ev.get("tls_version"))
        proto = protocols.setdefault(ref, {"suites": {}, "groups": set(), "count": 0})
        proto["count"] += 1
        cb.add(ref, "protocol", ptype=ptype, version=version, name=name)
        provided = {ref}
        suite = algs.cipher_suite(ev.get("cipher"))
        if suite is not None:
            group_ref = cb.algorithm(algs.group_algorithm(ev.get("group")))
            kx_ref = group_ref if group_ref and suite.kx in ("ECDHE", "DHE") else cb.algorithm(
                algs.kx_algorithm(suite.kx))
            auth = suite.auth or (suite.kx if suite.kx == "RSA" else None)
            mine = {r for r in (kx_ref, cb.algorithm(algs.auth_algorithm(auth, ev.get("peer_key_type"),
                                                                          ev.get("peer_key_bits"))),
                                cb.algorithm(suite.cipher), cb.algorithm(suite.hash)) if r}
            proto["suites"].setdefault(suite.name, (suite, set()))[1].update(mine)
            provided |= mine
            cb.suite_ids[suite.name] = suite.identifiers
        group_ref = cb.algorithm(algs.group_algorithm(ev.get("group")))
        if group_ref:
            proto["groups"].add(group_ref)
            provided.add(group_ref)
        who = {"pid": ev.get("pid"), "process": ev.get("process"), "exe": ev.get("exe"), "uid": ev.get("uid"),
               "ppid": ev.get("ppid"), "running_as": _user(ev.get("uid"))}
        cb.occurrence(ref, ev.get("exe"), f"pid {ev.get('pid')} ({ev.get('process')}) via {ev.get('library')}")
        cb.prop(ref, "process", _process_fact(who))
        for lib_ref in _handshake_libraries(ev, libs_by_pid):
            cb.provides.setdefault(lib_ref, set()).update(provided)
    _prune_generic(cb, [refs for proto in protocols.values() for _suite, refs in proto["suites"].values()])
    for ref, proto in protocols.items():
        entry = cb.components[ref]
        entry["args"]["suites"] = proto["suites"]
        entry["args"]["groups"] = proto["groups"]
        cb.prop(ref, "handshakes", proto["count"])


def _protocol(text: str | None) -> tuple[str, str, str | None, str]:
    """(bom-ref, protocolProperties type, version, name) of a handshake's tls_version: "TLSv1.3";
    SSLv3 (not TLS: type other); unknown (the library did not say): TLS without a version."""
    version = algs.tls_version(text)
    if version:
        return f"crypto/protocol/tls@{version}", "tls", version, f"TLSv{version}"
    if text and text.upper().startswith("SSLV"):
        version = text[4:] + ".0" if text[4:].isdigit() else text[4:]
        return f"crypto/protocol/ssl@{version}", "other", version, text
    return "crypto/protocol/tls", "tls", None, "TLS"


# a suite's authentication named only by family ("RSA") next to the key one handshake showed ("RSA-2048")
_GENERIC_AUTH = {"RSA": "RSA-", "ECDSA": "EC-", "DSA": "DSA-"}


def _prune_generic(cb: _Cbom, suite_refs: list[set]) -> None:
    """Drop a suite's (or a library's provided) family-only algorithm where the same set names the
    key of that family (one handshake saw the peer's certificate, another did not); drop the
    family-only algorithm itself when nothing refers to it any more."""
    names = {ref: e["args"]["alg"].name for ref, e in cb.components.items() if e["kind"] == "algorithm"}

    def prune(refs: set) -> set:
        gone = {r for r in refs if names.get(r) in _GENERIC_AUTH
                and any(names.get(o, "").startswith(_GENERIC_AUTH[names[r]]) for o in refs)}
        refs -= gone
        return gone

    pruned = set()
    for refs in [*suite_refs, *cb.provides.values()]:
        pruned |= prune(refs)
    used = set().union(*suite_refs, *cb.provides.values(), *cb.depends.values())
    for ref in pruned - used:
        del cb.components[ref]


def _handshake_libraries(ev: dict, libs_by_pid: dict[int, list[tuple[str, str]]]) -> list[str]:
    """The library component that did this handshake: the process's mapped library of the event's
    family (its TLS library, e.g. libssl, not libcrypto), or its static TLS; none when the
    process is not in the snapshot (gone before it was taken)."""
    family = ev.get("library")
    mapped = libs_by_pid.get(ev.get("pid"), [])
    for name in _TLS_LIBRARIES.get(family, ()):
        refs = sorted(ref for lib, ref in mapped if lib == name)
        if refs:
            return refs
    return sorted(ref for lib, ref in mapped if lib == f"static:{family}")


# --- the Bom -------------------------------------------------------------------------------

def _component(ref: str, entry: dict):
    from cyclonedx.model import Property
    from cyclonedx.model.bom_ref import BomRef
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.component_evidence import ComponentEvidence, Occurrence
    from cyclonedx.model.crypto import (AlgorithmProperties, CertificateProperties, CryptoAssetType, CryptoFunction,
                                        CryptoMode, CryptoPrimitive, CryptoProperties, ProtocolProperties,
                                        ProtocolPropertiesCipherSuite, ProtocolPropertiesType,
                                        RelatedCryptoMaterialProperties, RelatedCryptoMaterialType)

    kind, a = entry["kind"], entry["args"]
    evidence = None
    if entry["occurrences"]:
        evidence = ComponentEvidence(occurrences=[
            Occurrence(location=loc, additional_context="; ".join(sorted(c for c in ctx if c)) or None)
            for loc, ctx in sorted(entry["occurrences"].items())])
    props = [Property(name=n, value=v) for n, v in sorted(entry["props"])]
    common = dict(bom_ref=ref, evidence=evidence, properties=props)
    if kind == "library":
        return Component(type=ComponentType.LIBRARY, name=a["name"], version=a["version"], **common)
    crypto = None
    if kind == "algorithm":
        alg: Algorithm = a["alg"]
        crypto = CryptoProperties(asset_type=CryptoAssetType.ALGORITHM, oid=alg.oid, algorithm_properties=AlgorithmProperties(
            primitive=CryptoPrimitive(alg.primitive), parameter_set_identifier=alg.parameter_set, curve=alg.curve,
            mode=CryptoMode(alg.mode) if alg.mode else None,
            crypto_functions=[CryptoFunction(f) for f in alg.functions],
            classical_security_level=alg.classical, nist_quantum_security_level=alg.quantum))
        name = alg.name
    elif kind == "certificate":
        info, path = a["info"], a["path"]
        ext = path.rsplit("/", 1)[-1].rpartition(".")[2] if "." in path.rsplit("/", 1)[-1] else None
        props_ = CertificateProperties(certificate_format="X.509", certificate_extension=ext)
        if info:
            props_ = CertificateProperties(
                subject_name=info["subject"], issuer_name=info["issuer"], not_valid_before=_date(info["not_before"]),
                not_valid_after=_date(info["not_after"]),
                signature_algorithm_ref=BomRef(a["signature_ref"]) if a.get("signature_ref") else None,
                subject_public_key_ref=BomRef(a["key_ref"]) if a.get("key_ref") else None,
                certificate_format="X.509", certificate_extension=ext)
        crypto = CryptoProperties(asset_type=CryptoAssetType.CERTIFICATE, certificate_properties=props_)
        name = a["name"]
    elif kind == "key":
        crypto = CryptoProperties(asset_type=CryptoAssetType.RELATED_CRYPTO_MATERIAL,
                                  related_crypto_material_properties=RelatedCryptoMaterialProperties(
                                      type=RelatedCryptoMaterialType(a["type"]), size=a["size"],
                                      algorithm_ref=BomRef(a["algorithm_ref"]) if a["algorithm_ref"] else None))
        name = a["name"]
    else:  # protocol
        suites = [ProtocolPropertiesCipherSuite(name=suite_name, algorithms=[BomRef(r) for r in sorted(refs)],
                                                identifiers=suite.identifiers)
                  for suite_name, (suite, refs) in sorted(a.get("suites", {}).items())]
        crypto = CryptoProperties(asset_type=CryptoAssetType.PROTOCOL, protocol_properties=ProtocolProperties(
            type=ProtocolPropertiesType(a["ptype"]), version=a["version"], cipher_suites=suites,
            crypto_refs=[BomRef(r) for r in sorted(a.get("groups", ()))]))
        name = a["name"]
    return Component(type=ComponentType.CRYPTOGRAPHIC_ASSET, name=name, crypto_properties=crypto, **common)


def build(doc: dict, handshakes: list[dict] | None = None) -> str:
    """The CBOM of a snapshot document (and tls_handshake events) as validated CycloneDX 1.6 JSON text.
    Raises TracerError when the library is missing or (a bug) the document does not validate."""
    check_available()
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.bom_ref import BomRef
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.dependency import Dependency
    from cyclonedx.output.json import JsonV1Dot6

    from crypto_tracer import __version__

    cb = _Cbom()
    libs_by_pid = _libraries(cb, doc)
    _files(cb, doc)
    _handshakes(cb, handshakes or [], libs_by_pid)

    components = {ref: _component(ref, entry) for ref, entry in cb.components.items()}
    scan = doc["scan"]
    meta_props = [Property(name=PROPERTY_PREFIX + k, value=str(v)) for k, v in (
        ("hostname", doc["hostname"]), ("kernel", doc["kernel"]), ("privileged", str(scan["privileged"]).lower()),
        ("processes_scanned", scan["processes_scanned"]), ("processes_unreadable", scan["processes_unreadable"]),
        ("processes_using_crypto", len(doc["processes"])), ("handshakes_read", len(handshakes or [])))]
    tool = Component(type=ComponentType.APPLICATION, name="crypto-tracer", version=__version__,
                     bom_ref=f"crypto-tracer@{__version__}")
    host = Component(type=ComponentType.OPERATING_SYSTEM, name="linux", version=doc["kernel"],
                     bom_ref=f"host/{_slug(doc['hostname'])}", description=f"host {doc['hostname']}")
    metadata = BomMetaData(timestamp=_date(doc["generated_at"]), component=host, properties=meta_props)
    metadata.tools.components.add(tool)
    bom = Bom(metadata=metadata, components=components.values(),
              serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"crypto-tracer:{doc['hostname']}:{doc['generated_at']}"))
    for ref, deps in sorted(cb.depends.items()):
        bom.dependencies.add(Dependency(ref=BomRef(ref), dependencies=[Dependency(ref=BomRef(d)) for d in sorted(deps)]))
    # the host depends on every library (what is loaded on it)
    bom.register_dependency(host, [c for c in components.values() if c.type == ComponentType.LIBRARY])
    data = json.loads(JsonV1Dot6(bom).output_as_string())
    _post_process(data, cb)
    text = json.dumps(data, indent=2, ensure_ascii=False)
    validate(text)
    return text


def _post_process(data: dict, cb: _Cbom) -> None:
    """What the lib cannot model: dependencies[].provides, suite identifiers in byte order, an order
    of evidence occurrences."""
    deps = {d["ref"]: d for d in data.setdefault("dependencies", [])}
    for ref, provided in sorted(cb.provides.items()):
        entry = deps.get(ref)
        if entry is None:
            entry = deps[ref] = {"ref": ref}
            data["dependencies"].append(entry)
        entry["provides"] = sorted(provided)
    data["dependencies"].sort(key=lambda d: d["ref"])
    for comp in data.get("components", []):
        occurrences = comp.get("evidence", {}).get("occurrences")
        if occurrences:  # the lib's Occurrence has no order: its set comes out in hash order
            occurrences.sort(key=lambda o: (o["location"], o.get("additionalContext", "")))
        for suite in comp.get("cryptoProperties", {}).get("protocolProperties", {}).get("cipherSuites", []):
            ids = cb.suite_ids.get(suite.get("name"))
            if ids:
                suite["identifiers"] = ids


def validate(text: str) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        detail = str(getattr(error, "data", None) and error.data.message or error).splitlines()[0]
        raise TracerError(f"internal error: the CBOM does not validate against the CycloneDX 1.6 schema: {detail}",
                          ExitStatus.ERROR, "nothing was written; please report this as a bug")
