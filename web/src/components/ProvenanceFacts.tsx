import type { components } from "../api/schema";

type Provenance = components["schemas"]["Provenance"];

const C2PA_STATUS: Record<string, string> = {
  trusted: "valid signature by a signer on the trust list",
  untrusted: "valid signature, but the signer is not on this service's trust list",
  tampered: "changed after it was signed (tampered)",
  invalid: "the manifest does not validate",
  error: "present but could not be read",
};

/** What the file's own metadata claims (C2PA, IPTC/XMP), shown apart from the verdict, which ignores it. */
export function ProvenanceFacts({ provenance, heading: Heading }: {
  provenance: Provenance | null | undefined; heading: "h3" | "h4";
}) {
  if (!provenance) return null;
  const { c2pa, declared_ai: declared, declared_ai_source: source } = provenance;
  const claim = declared === true ? "says it was made with generative AI"
    : declared === false ? "says it was not made with generative AI" : "makes no claim about how it was made";
  const where = source === "c2pa" ? " (in its C2PA manifest)" : source === "xmp" ? " (in its IPTC/XMP metadata)" : "";
  const sourceType = provenance.iptc_digital_source_type;
  const issuer = (c2pa.signer as { issuer?: string } | null | undefined)?.issuer;
  return (
    <section className="provenance" aria-label="Provenance" data-testid="provenance">
      <Heading>What the file says about itself</Heading>
      <p data-testid="declared">
        The metadata {claim}{where}. The verdict above does not use it: metadata is easy to strip or forge.
      </p>
      <dl className="facts">
        <dt>C2PA</dt>
        <dd data-testid="c2pa">
          {c2pa.present ? C2PA_STATUS[c2pa.status ?? "error"] ?? c2pa.status : "no Content Credentials"}
          {c2pa.present && c2pa.claim_generator ? `; made with ${c2pa.claim_generator}` : ""}
          {c2pa.present && issuer ? `; signed by ${issuer}` : ""}
        </dd>
        {sourceType && <><dt>IPTC source type</dt><dd data-testid="source-type">{sourceType.label ?? sourceType.code}</dd></>}
      </dl>
    </section>
  );
}
